"""Hostile input against every route of the served app (conftest ``served``: API keys and an admin key on): lone
UTF-16 surrogates, NUL bytes, bodies over the cap (declared and chunked), wrong types, bad JSON, unknown ids, missing
and wrong keys. Each is answered with an OpenAI-shaped 4xx (or served, where the input is harmless), never a 5xx;
afterwards ordinary requests, ratings, preferences and exports on the same server still succeed and nothing recorded
before is lost. Issue 23: one chat request holding ``"\\ud800"`` was answered 200 and then broke ``POST
/v1/feedback`` for every user (the feedback store refused the batch holding it, and kept retrying it)."""

from __future__ import annotations

import argparse
import json
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from tests.helpers import SERVE_ADMIN_KEY, SERVE_KEYS

pytestmark = pytest.mark.slow

KEY, OTHER_KEY = SERVE_KEYS
SURROGATE = "\ud800"  # json.dumps writes it as the escape \ud800: valid JSON, no character
NUL = "a\x00b"


@pytest.fixture(scope="module")
def server(served):
    """The session's one served app (conftest ``served``)."""
    return served


def call(
    server, method: str, path: str, body: Any = None, key: str | None = KEY, raw: bytes | None = None, **params
) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if body is not None:
        raw = json.dumps(body).encode()  # ensure_ascii: a lone surrogate goes out as its escape
    if raw is not None:
        headers["Content-Type"] = "application/json"
    return httpx.request(
        method, server["base"] + path, content=raw, headers=headers, params=params or None, timeout=120
    )


def chat_body(content: Any = "hello", **kw) -> dict:
    return {"model": "tiny", "messages": [{"role": "user", "content": content}], "max_tokens": 3, "rag": False, **kw}


def ok(r: httpx.Response) -> dict:
    assert r.status_code == 200, r.text
    return r.json()


def refused(r: httpx.Response, *statuses: int) -> dict:
    """A 4xx in OpenAI's error shape (one of ``statuses`` when given): never a 5xx, never a crash."""
    assert 400 <= r.status_code < 500 and (not statuses or r.status_code in statuses), (r.status_code, r.text)
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


def rate(server, response_id: str, rating: Any = "up", key: str = KEY) -> httpx.Response:
    return call(server, "POST", "/v1/feedback", {"response_id": response_id, "rating": rating}, key=key)


def test_issue_23_a_lone_surrogate_is_refused_and_feedback_keeps_working(server):
    before = ok(call(server, "POST", "/v1/chat/completions", chat_body("rate me before")))
    ok(rate(server, before["id"]))
    err = refused(call(server, "POST", "/v1/chat/completions", chat_body(SURROGATE)), 400)
    assert err["code"] == "invalid_unicode" and err["param"] == "messages.0.content"
    after = ok(call(server, "POST", "/v1/chat/completions", chat_body("rate me after")))
    ok(rate(server, after["id"], "down"))  # was a 500 (RayTaskError(UnicodeEncodeError)) for everyone
    ok(rate(server, before["id"], 5, key=OTHER_KEY))  # another user's rating of an older response too


def test_a_bad_record_reaching_the_store_never_blocks_its_batch(server):
    """Past the edge (through the Ray handle the ingress uses): text SQLite cannot hold is stored with U+FFFD and a
    malformed record is skipped, the rest of the batch recorded; ratings of the batch's other records succeed."""
    from ray import serve

    feedback = serve.get_deployment_handle("Feedback", server["app"])
    good = {"response_id": "hostile-good", "model": "tiny", "prompt": "p", "response": "fine", "messages": None}
    bad = {
        "response_id": "hostile-bad",
        "model": "tiny",
        "prompt": "p" + SURROGATE,
        "response": SURROGATE,
        "messages": [{"role": "user", "content": SURROGATE}],
    }
    assert feedback.record_responses.remote([bad, {"response_id": 5}, good]).result(timeout_s=60) == 2
    ok(rate(server, "hostile-good"))
    ok(rate(server, "hostile-bad", "down"))


def hostile_requests(server) -> list[tuple[str, str, dict]]:
    """(method, path, call keyword args) for every route: each must be answered < 500."""
    big = "y" * (server["cfg"].max_body_bytes + 10)
    out: list[tuple[str, str, dict]] = []
    posts = {
        "/v1/chat/completions": [
            chat_body(SURROGATE),
            chat_body([{"type": "text", "text": SURROGATE}]),
            chat_body("hi", user=SURROGATE),
            chat_body("hi", stop=[SURROGATE]),
            chat_body(NUL),
            chat_body("hi", user=NUL),
            chat_body(5),
            chat_body(None),
            chat_body(NUL + " okapi", rag=True),
            chat_body(SURROGATE + " okapi", rag=True),
            chat_body([{"type": "image_url", "image_url": {"url": "x"}}]),
            chat_body([5]),
            {"model": "tiny", "messages": {}},
            {"model": ["tiny"], "messages": []},
            {"model": "tiny"},
            {"messages": [{"role": "user", "content": "hi"}]},
            chat_body("hi", max_tokens=-1),
            chat_body("hi", max_tokens=10**12),
            chat_body("hi", n=10**6),
            chat_body("hi", temperature="hot"),
            chat_body("hi", logit_bias={SURROGATE: 1}),
            chat_body("hi", logit_bias={"x": 1}),
            chat_body("hi", response_format={"type": "json_schema"}),
            chat_body("hi", stream=True, stream_options=5),
            chat_body("hi", seed="x"),
            {"model": "tiny", "messages": [{"role": "user", "content": "hi", SURROGATE: 1}]},
            {"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]},
        ],
        "/v1/completions": [
            {"model": "tiny", "prompt": SURROGATE},
            {"model": "tiny", "prompt": NUL, "max_tokens": 2},
            {"model": "tiny", "prompt": [-1]},
            {"model": "tiny", "prompt": [10**9]},
            {"model": "tiny", "prompt": [[1, 2]]},
            {"model": "tiny", "prompt": []},
            {"model": "tiny", "prompt": ["a", "b"]},
            {"model": "tiny", "prompt": {"a": 1}},
            {"model": "tiny", "prompt": "x", "logprobs": 999},
            {"model": "tiny", "prompt": True},
        ],
        "/v1/embeddings": [
            {"model": "tiny", "input": SURROGATE},
            {"model": "tiny", "input": NUL},
            {"model": "tiny", "input": []},
            {"model": "tiny", "input": [[-1]]},
            {"model": "tiny", "input": [""]},
            {"model": "tiny", "input": 5},
            {"model": "tiny", "input": ["x"] * 10_000},
            {"model": "tiny", "input": "x", "encoding_format": "hex"},
        ],
        "/v1/documents": [
            {"text": SURROGATE},
            {"id": SURROGATE, "text": "x"},
            {"title": 5, "text": "x"},
            {"documents": []},
            {"documents": [{"text": SURROGATE}]},
            {"documents": "x"},
            {"text": "   "},
            {"text": "x", "documents": [{"text": "y"}]},
            {"id": "x"},
            {},
            {"id": "hostile-nul" + NUL, "text": "nul bytes " + NUL},
        ],
        "/v1/memory": [
            {"user": SURROGATE, "fact": "x"},
            {"user": "hostile", "fact": SURROGATE},
            {"user": "", "fact": "x"},
            {"user": "u" * 300, "fact": "x"},
            {"user": "hostile", "fact": 5},
            {"user": "hostile", "fact": "f" * 2000},
            {"user": "hostile"},
            {"user": "hostile-nul" + NUL, "fact": "nul bytes " + NUL},
        ],
        "/v1/feedback": [
            {"response_id": SURROGATE, "rating": "up"},
            {"response_id": "x", "rating": SURROGATE},
            {"response_id": "chatcmpl-" + NUL, "rating": "up"},
            {"response_id": "nope", "rating": "up"},
            {"response_id": "x", "rating": True},
            {"response_id": "x", "rating": [1]},
            {"response_id": 5, "rating": "up"},
            {"rating": "up"},
            {"response_id": "x"},
            {},
            {"chosen_id": "x"},
            {"chosen_id": SURROGATE, "rejected_id": "y"},
            {"chosen_id": "a", "rejected_id": "b", "rating": "up"},
            {"response_id": "x", "extra": 1},
            {"response_id": "x", "rating": "up", "comment": SURROGATE},
        ],
    }
    for path, bodies in posts.items():
        out += [("POST", path, {"body": b}) for b in bodies]
        for raw in (
            b"",
            b"{",
            b"null",
            b"[]",
            b'"x"',
            b"\xff\xfe",
            b'{"model": "tiny"}' + b"\x00",
            b"[" * 3000 + b"]" * 3000,
            b'{"a": ' * 3000,
            json.dumps({"text": big}).encode(),
        ):
            out.append(("POST", path, {"raw": raw}))
        out.append(("POST", path, {"body": {"text": "x"}, "key": None}))  # no key
        out.append(("POST", path, {"body": {"text": "x"}, "key": "wrong"}))  # a key no one has
    admin = [
        {"model": SURROGATE},
        {"model": 5},
        {"model": "/nowhere" + NUL},
        {"model": "relative"},
        {},
        {"model": "/x", "extra": 1},
    ]
    out += [("POST", "/admin/models", {"body": b, "key": SERVE_ADMIN_KEY}) for b in admin]
    out += [("POST", "/admin/models", {"raw": raw, "key": SERVE_ADMIN_KEY}) for raw in (b"{", b"\xff", b"[" * 3000)]
    out += [("POST", "/admin/models", {"body": {"model": "/x"}, "key": k}) for k in (None, KEY)]
    gets = [
        ("GET", "/v1/documents/%ED%A0%80", {}),
        ("GET", "/v1/documents/nope%00", {}),
        ("DELETE", "/v1/documents/nope", {}),
        ("DELETE", "/v1/documents/%ED%A0%80", {}),
        ("GET", "/v1/memory?user=%ED%A0%80", {}),
        ("GET", "/v1/memory", {"params": {"user": ""}}),
        ("DELETE", "/v1/memory/x?user=%ED%A0%80", {}),
        ("GET", "/v1/memory?user=%FF%00", {}),
        ("GET", "/v1/memory", {"params": {"user": "u" * 300}}),
        ("GET", "/v1/memory", {"params": {"user": NUL}}),
        ("DELETE", "/v1/memory/nope", {"params": {"user": "hostile"}}),
        ("DELETE", "/v1/memory/nope", {}),
        ("GET", "/v1/models", {"key": None}),
        ("GET", "/v1/models", {"key": "wrong"}),
        ("GET", "/v1/nope", {}),
        ("PUT", "/v1/chat/completions", {"body": chat_body()}),
    ]
    return out + gets


def send(server, method: str, path: str, kw: dict) -> httpx.Response:
    """One hostile request; a path holding ``%`` is sent percent-encoded as written (bytes that are no UTF-8, the
    escape of a lone surrogate: what no client library would encode itself)."""
    kw = dict(kw)
    params = kw.pop("params", {})
    if "%" in path:
        return httpx.request(
            method, httpx.URL(server["base"] + path), headers={"Authorization": f"Bearer {KEY}"}, timeout=120
        )
    return call(server, method, path, **kw, **params)


def test_hostile_input_on_every_route_then_ordinary_use_still_works(server, tmp_path):
    from cluster.commands.feedback import run as run_export
    from serve.feedback import FeedbackStore

    # recorded before: a rated response, a preference, a document and a memory fact
    a = ok(call(server, "POST", "/v1/chat/completions", chat_body("hostile baseline", temperature=0.0)))
    b = ok(call(server, "POST", "/v1/chat/completions", chat_body("hostile baseline", temperature=1.0, seed=3)))
    ok(rate(server, a["id"], "up"))
    ok(rate(server, b["id"], "down"))
    ok(call(server, "POST", "/v1/feedback", {"chosen_id": a["id"], "rejected_id": b["id"]}))
    ok(call(server, "POST", "/v1/documents", {"id": "hostile-doc", "title": "Okapi", "text": "Okapis are giraffids."}))
    fact = ok(call(server, "POST", "/v1/memory", {"user": "hostile", "fact": "likes okapis"}))

    answers: dict[int, int] = {}
    for method, path, kw in hostile_requests(server):
        r = send(server, method, path, kw)
        assert r.status_code < 500, (method, path, kw, r.status_code, r.text[:300])
        if r.status_code >= 400:
            refused(r)
        answers[r.status_code] = answers.get(r.status_code, 0) + 1
    # bodies over the cap: declared (Content-Length) and streamed (chunked, no length): 413 either way
    cap = server["cfg"].max_body_bytes
    refused(call(server, "POST", "/v1/chat/completions", chat_body("z" * (4 * cap))), 413)

    def chunks():
        yield b'{"model": "tiny", "messages": [{"role": "user", "content": "'
        for _ in range(5):
            yield b"z" * cap
        yield b'"}]}'

    r = httpx.post(
        server["base"] + "/v1/chat/completions",
        content=chunks(),
        timeout=120,
        headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
    )
    assert "content-length" not in r.request.headers
    refused(r, 413)
    assert answers.get(200, 0) < sum(answers.values()) / 2 and answers.get(400, 0) > 0 and answers.get(422, 0) > 0

    # ordinary use on the same server: answers, ratings, a preference, retrieval, memory, export
    c = ok(call(server, "POST", "/v1/chat/completions", chat_body("hostile baseline", temperature=0.0)))
    assert c["choices"][0]["message"]["content"] == a["choices"][0]["message"]["content"]  # same greedy answer
    ok(rate(server, c["id"], 4))
    ok(rate(server, a["id"], "up", key=OTHER_KEY))
    ok(call(server, "POST", "/v1/feedback", {"chosen_id": c["id"], "rejected_id": b["id"]}))
    ok(call(server, "POST", "/v1/completions", {"model": "tiny", "prompt": "def main():", "max_tokens": 2}))
    assert ok(call(server, "GET", "/v1/documents/hostile-doc"))["title"] == "Okapi"
    rag = ok(call(server, "POST", "/v1/chat/completions", chat_body("tell me about okapis giraffids", rag=True)))
    assert {"id": "hostile-doc", "title": "Okapi"} in rag["rag"]["documents"]
    facts = ok(call(server, "GET", "/v1/memory", user="hostile"))["data"]
    assert [f["id"] for f in facts if f["fact"] == "likes okapis"] == [fact["id"]]
    out = tmp_path / "prefs.jsonl"
    assert (
        run_export(argparse.Namespace(store=str(server["state"] / "feedback.db"), out=str(out), ratings_out=None)) == 0
    )
    prefs = [json.loads(ln) for ln in out.read_text(encoding="utf-8").splitlines()]
    ratings = [json.loads(ln) for ln in (tmp_path / "prefs.ratings.jsonl").read_text(encoding="utf-8").splitlines()]
    text = {x["id"]: x["choices"][0]["message"]["content"] for x in (a, b, c)}
    mine = [(p["chosen"], p["rejected"], p["source"]) for p in prefs if "hostile baseline" in p["prompt"]]
    assert (text[a["id"]], text[b["id"]], "user") in mine and (text[c["id"]], text[b["id"]], "user") in mine
    scores = sorted(r["score"] for r in ratings if "hostile baseline" in r["prompt"])
    assert scores == [-1.0, 0.5, 1.0, 1.0]  # b down; c 4 stars; a up twice (two users): nothing lost
    store = FeedbackStore(server["state"] / "feedback.db")
    assert all(store.response(x["id"]) is not None for x in (a, b, c))

    # clean up what this module added to the shared app's stores (other modules retrieve from them)
    for doc in ("hostile-doc", "hostile-nul" + NUL):
        ok(call(server, "DELETE", "/v1/documents/" + quote(doc, safe="")))
    for user in ("hostile", "hostile-nul" + NUL):
        for f in ok(call(server, "GET", "/v1/memory", user=user))["data"]:
            ok(call(server, "DELETE", f"/v1/memory/{f['id']}", user=user))

"""genloop serve end to end: real Ray Serve on the session's Ray, real vLLM CPU engine, the `tiny` checkpoint, the
official openai client. The app (conftest ``served``, shared with test_serve_openai and test_serve_versions) starts
once for the session; the store's durability is checked with a fresh Retriever process."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.helpers import SERVE_KEYS

pytestmark = pytest.mark.slow

KEY_A, KEY_B = SERVE_KEYS


@pytest.fixture(scope="module")
def server(served):
    """The session's one served app (conftest ``served``): real Ray Serve, real vLLM CPU engine."""
    return served


def client(server, key=KEY_A):
    import openai

    return openai.OpenAI(base_url=server["base"] + "/v1", api_key=key, max_retries=0, timeout=60)


def post(server, path, body, key=KEY_A, raw: bytes | None = None):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if raw is not None:
        headers["Content-Type"] = "application/json"
        return httpx.post(server["base"] + path, content=raw, headers=headers, timeout=60)
    return httpx.post(server["base"] + path, json=body, headers=headers, timeout=60)


def get(server, path, key=KEY_A, **params):
    return httpx.get(server["base"] + path, headers={"Authorization": f"Bearer {key}"}, params=params, timeout=60)


def assert_error(r, status, code=None):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if code:
        assert err["code"] == code


def test_models_health_and_chat(server):
    assert httpx.get(server["base"] + "/health").json()["status"] == "ok"
    c = client(server)
    assert [m.id for m in c.models.list().data] == ["tiny"]
    r = c.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "hello there"}],
        max_tokens=8,
        temperature=0.0,
        extra_body={"rag": False},
    )
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert r.choices[0].message.role == "assistant" and isinstance(r.choices[0].message.content, str)
    assert 1 <= r.usage.completion_tokens <= 8
    assert r.choices[0].finish_reason in ("stop", "length")
    assert (r.choices[0].finish_reason == "length") == (r.usage.completion_tokens == 8)
    assert r.model_extra["rag"] == {"documents": [], "memories": 0}
    # greedy is deterministic: the same request gives the same answer
    r2 = c.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "hello there"}],
        max_tokens=8,
        temperature=0.0,
        extra_body={"rag": False},
    )
    assert r2.choices[0].message.content == r.choices[0].message.content


def test_chat_streaming_matches_non_streaming(server):
    c = client(server)
    msgs = [{"role": "user", "content": "count to three"}]
    full = c.chat.completions.create(
        model="tiny",
        messages=msgs,
        max_tokens=12,
        temperature=0.0,
        seed=1,
        extra_body={"rag": False, "ignore_eos": True},
    )
    assert full.usage.completion_tokens == 12 and full.choices[0].finish_reason == "length"
    chunks = list(
        c.chat.completions.create(
            model="tiny",
            messages=msgs,
            max_tokens=12,
            temperature=0.0,
            seed=1,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"rag": False, "ignore_eos": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(ch.id == chunks[0].id for ch in chunks)
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == full.choices[0].message.content
    finals = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finals == ["length"]
    assert chunks[-1].usage.completion_tokens == 12 and not chunks[-1].choices


def test_completions_and_stream_wire_format(server):
    c = client(server)
    r = c.completions.create(
        model="tiny", prompt="def main():", max_tokens=6, temperature=0.0, extra_body={"ignore_eos": True}
    )
    assert r.object == "text_completion" and r.usage.completion_tokens == 6
    pieces = [
        ch.choices[0].text
        for ch in c.completions.create(
            model="tiny",
            prompt="def main():",
            max_tokens=6,
            temperature=0.0,
            stream=True,
            extra_body={"ignore_eos": True},
        )
    ]
    assert "".join(pieces) == r.choices[0].text
    # the raw SSE stream ends with data: [DONE]
    with httpx.stream(
        "POST",
        server["base"] + "/v1/completions",
        headers={"Authorization": f"Bearer {KEY_A}"},
        json={"model": "tiny", "prompt": "x = ", "max_tokens": 3, "stream": True},
        timeout=60,
    ) as resp:
        lines = [ln for ln in resp.iter_lines() if ln]
    assert resp.headers["content-type"].startswith("text/event-stream")
    assert lines[-1] == "data: [DONE]" and all(ln.startswith("data: ") for ln in lines)
    json.loads(lines[0][6:])


def test_document_added_over_http_is_retrieved_and_survives_a_store_restart(server):
    c = client(server)
    doc = {"id": "zebra-facts", "title": "Zebras", "text": "Quagga zebras are striped equines from Africa. " * 10}
    r = post(server, "/v1/documents", doc)
    assert r.status_code == 200, r.text
    assert r.json()["data"][0]["id"] == "zebra-facts" and r.json()["data"][0]["chunks"] >= 2
    ask = dict(
        model="tiny",
        messages=[{"role": "user", "content": "tell me about quagga zebras"}],
        max_tokens=4,
        temperature=0.0,
    )
    out = c.chat.completions.create(**ask)
    assert {"id": "zebra-facts", "title": "Zebras"} in out.model_extra["rag"]["documents"]
    # the context went into the prompt: more prompt tokens than without RAG
    plain = c.chat.completions.create(**ask, extra_body={"rag": False})
    assert out.usage.prompt_tokens > plain.usage.prompt_tokens and plain.model_extra["rag"]["documents"] == []
    # restart the process that holds the store: Ray Serve replaces the killed Retriever replica, the new process
    # opens the store from disk and the document is still there. (Was a whole-app restart, serve.delete + serve.run:
    # the same fresh store process, plus a new vLLM engine that took 1-6 minutes and checks nothing about the
    # store; test_serve_versions kills and replaces the Generator replica.)
    import time

    import openai
    import ray

    def retriever_replicas() -> list[str]:
        return [
            a["name"]
            for a in ray.util.list_named_actors(all_namespaces=True)
            if a["namespace"] == "serve" and a["name"].startswith(f"SERVE_REPLICA::{server['app']}#Retriever#")
        ]

    (old,) = retriever_replicas()
    ray.kill(ray.get_actor(old, namespace="serve"), no_restart=True)
    deadline = time.time() + 300
    while True:  # requests fail while no Retriever replica is up; wait for the new one
        try:
            again = client(server).chat.completions.create(**ask)
            break
        except openai.APIError:
            assert time.time() < deadline, "no Retriever replica came back"
            time.sleep(1)
    assert retriever_replicas() != [old]  # a new process answered
    assert {"id": "zebra-facts", "title": "Zebras"} in again.model_extra["rag"]["documents"]
    # delete removes it from retrieval; deleting twice is a 404
    assert (
        httpx.delete(
            server["base"] + "/v1/documents/zebra-facts", headers={"Authorization": f"Bearer {KEY_A}"}
        ).status_code
        == 200
    )
    gone = client(server).chat.completions.create(**ask)
    assert gone.model_extra["rag"]["documents"] == []
    assert_error(
        httpx.delete(server["base"] + "/v1/documents/zebra-facts", headers={"Authorization": f"Bearer {KEY_A}"}), 404
    )


def test_rag_eval_posts_invented_facts_and_counts_served_answers(server, tmp_path, capsys):
    """`rag-eval --facts --model URL` on the served tiny model (wiring; its answers are noise): the facts POSTed
    are retrieved by the very next requests (``rag.documents``), RAG off retrieves nothing, the counts add up."""
    import argparse

    from cluster.commands import rag_eval as cmd
    from serve.fact_eval import invented_facts

    parser = argparse.ArgumentParser()
    cmd.register(parser.add_subparsers())
    out = tmp_path / "r.json"
    args = parser.parse_args(
        ["rag-eval", "--store", str(tmp_path / "store"), "--facts", "4", "--seed", "7", "--distractors", "2"]
        + ["--model", server["base"], "--api-key", KEY_A, "--max-tokens", "3", "--show-answers", "4"]
        + ["--json", str(out)]
    )
    facts = invented_facts(4, seed=7, distractors=2)
    try:
        assert cmd.run(args) == 0
        assert f"POSTed {len(facts.documents)} fact documents" in capsys.readouterr().out
        res = json.loads(out.read_text())["answers"]
        on, off = res["rag_on"], res["rag_off"]
        assert on["n"] == off["n"] == 4 and off["retrieved"] == 0 and on["retrieved"] >= 3
        samples = res["samples"]
        assert on["k"] == sum(s["answer"].lower() in s["rag_on"].lower() for s in samples)
        assert off["k"] == sum(s["answer"].lower() in s["rag_off"].lower() for s in samples)
    finally:
        for d in facts.documents:
            httpx.delete(server["base"] + "/v1/documents/" + d["id"], headers={"Authorization": f"Bearer {KEY_A}"})


def test_feedback_round_trip_to_export(server, tmp_path):
    from cluster.commands.feedback import run as run_export

    c = client(server)
    ask = dict(
        model="tiny", messages=[{"role": "user", "content": "write a haiku"}], max_tokens=6, extra_body={"rag": False}
    )
    a = c.chat.completions.create(temperature=0.0, **ask)
    b = c.chat.completions.create(temperature=1.0, seed=7, **ask)
    assert post(server, "/v1/feedback", {"response_id": a.id, "rating": "up"}).status_code == 200
    assert post(server, "/v1/feedback", {"response_id": b.id, "rating": 2}).status_code == 200
    assert post(server, "/v1/feedback", {"chosen_id": a.id, "rejected_id": b.id}).status_code == 200
    # the feedback deployment's errors cross a Ray handle and still answer as what they are (not 500)
    assert_error(
        post(server, "/v1/feedback", {"response_id": "chatcmpl-nope", "rating": "up"}), 404, "response_not_found"
    )
    assert_error(
        post(server, "/v1/feedback", {"chosen_id": a.id, "rejected_id": "chatcmpl-nope"}), 404, "response_not_found"
    )
    assert_error(post(server, "/v1/feedback", {"response_id": a.id, "rating": 9}), 400)
    assert_error(post(server, "/v1/feedback", {"chosen_id": a.id, "rejected_id": a.id}), 400)
    import argparse

    out = tmp_path / "prefs.jsonl"
    run_export(argparse.Namespace(store=str(server["state"] / "feedback.db"), out=str(out), ratings_out=None))
    prefs = [json.loads(ln) for ln in out.read_text().splitlines()]
    ratings = [json.loads(ln) for ln in (tmp_path / "prefs.ratings.jsonl").read_text().splitlines()]
    mine = [
        p
        for p in prefs
        if p["chosen"] == a.choices[0].message.content and p["rejected"] == b.choices[0].message.content
    ]
    assert mine and mine[0]["prompt"].endswith("<|im_start|>assistant\n") and "write a haiku" in mine[0]["prompt"]
    assert mine[0]["messages"] == [{"role": "user", "content": "write a haiku"}]
    by_resp = {r["response"]: r["score"] for r in ratings}
    assert by_resp[a.choices[0].message.content] == 1.0 and by_resp[b.choices[0].message.content] == -0.5


def test_memory_is_private_per_user_and_key(server):
    c = client(server)
    r = post(server, "/v1/memory", {"user": "alice", "fact": "alice keeps a pet iguana named Rex"})
    assert r.status_code == 200, r.text
    assert [f["fact"] for f in get(server, "/v1/memory", user="alice").json()["data"]] == [
        "alice keeps a pet iguana named Rex"
    ]
    assert get(server, "/v1/memory", user="bob").json()["data"] == []
    assert get(server, "/v1/memory", key=KEY_B, user="alice").json()["data"] == []  # another key's "alice"
    ask = dict(
        model="tiny",
        messages=[{"role": "user", "content": "what pet do I have?"}],
        max_tokens=4,
        extra_body={"rag": False},
    )
    assert c.chat.completions.create(user="alice", **ask).model_extra["rag"]["memories"] == 1
    assert c.chat.completions.create(user="bob", **ask).model_extra["rag"]["memories"] == 0
    assert client(server, KEY_B).chat.completions.create(user="alice", **ask).model_extra["rag"]["memories"] == 0
    fid = get(server, "/v1/memory", user="alice").json()["data"][0]["id"]
    assert_error(
        httpx.delete(
            server["base"] + f"/v1/memory/{fid}", params={"user": "bob"}, headers={"Authorization": f"Bearer {KEY_A}"}
        ),
        404,
    )  # bob cannot delete alice's


def test_bad_input_gets_openai_errors_and_server_keeps_serving(server):
    import openai

    # 401: no key, wrong key, on generation and on data routes
    with pytest.raises(openai.AuthenticationError):
        client(server, "wrong").models.list()
    assert_error(post(server, "/v1/documents", {"text": "x"}, key=None), 401, "invalid_api_key")
    assert_error(post(server, "/v1/feedback", {"response_id": "a", "rating": "up"}, key="nope"), 401)
    assert_error(get(server, "/v1/memory", key="nope", user="alice"), 401)
    # 400: malformed JSON, empty messages, context overflow (with the numbers), max_tokens over the cap
    assert_error(
        post(server, "/v1/chat/completions", None, raw=b'{"model": "tiny", "messages": ['), 400, "invalid_json"
    )
    c = client(server)
    with pytest.raises(openai.BadRequestError):
        c.chat.completions.create(model="tiny", messages=[], max_tokens=4)
    r = post(server, "/v1/completions", {"model": "tiny", "prompt": "word " * 120, "max_tokens": 60})
    assert_error(r, 400, "context_length_exceeded")
    assert "128" in r.json()["error"]["message"] and "60" in r.json()["error"]["message"]
    assert_error(post(server, "/v1/completions", {"model": "tiny", "prompt": "a", "max_tokens": 65}), 400)
    # 404: unknown model
    with pytest.raises(openai.NotFoundError):
        c.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "hi"}])
    # 413: body over the cap, document over the cap
    assert_error(post(server, "/v1/documents", {"text": "y" * 30_000}), 413)
    assert_error(post(server, "/v1/documents", {"id": "big", "text": "y" * 6_000}), 413, "document_too_large")
    # 422: wrong types
    assert_error(post(server, "/v1/chat/completions", {"model": "tiny", "messages": "hello"}), 422)
    with pytest.raises(openai.UnprocessableEntityError):
        c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens="lots")
    assert_error(post(server, "/v1/memory", {"user": "alice"}), 422)
    assert_error(post(server, "/v1/memory", {"user": "alice", "fact": "  "}), 400)  # raised in the retriever
    # nothing stored was lost and the server still answers
    assert get(server, "/v1/documents/big").status_code == 404
    ok = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "still there?"}], max_tokens=3)
    assert ok.usage.completion_tokens >= 1

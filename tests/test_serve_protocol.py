"""The HTTP layer's plain parts: request parsing/errors (serve.schemas, serve.errors), API keys (serve.auth), rate
limiter (serve.ratelimit), streaming detokenisation (serve.detokenize), RAG prompt assembly within the context budget.
No Ray, no vLLM."""

from __future__ import annotations

import json

import pytest

from serve.auth import authorize, key_id, load_api_keys
from serve.detokenize import TextStream
from serve.errors import APIError
from serve.ratelimit import RateLimiter
from serve.schemas import ChatRequest, parse_body


def test_parse_body_status_codes():
    ok = parse_body(
        b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "extra_field": 1}', ChatRequest, 1000
    )
    assert ok.messages[0].text() == "hi" and ok.rag is True and ok.max_tokens is None
    with pytest.raises(APIError) as e:  # parsed, but an option the server does not know is a 400 naming it
        ok.check_options()
    assert (e.value.status, e.value.param, e.value.code) == (400, "extra_field", "unsupported_option")
    cases = [
        (b"x" * 1001, 413),
        (b'{"model": ', 400),
        (b"[1, 2]", 400),
        (b'{"model": "m", "messages": "hello"}', 422),
        (b'{"messages": []}', 422),
        (b'{"model": "m", "messages": [{"role": "robot", "content": "x"}]}', 422),
        (b'{"model": "m", "messages": [], "temperature": 9}', 422),
    ]
    for raw, status in cases:
        with pytest.raises(APIError) as e:
            parse_body(raw, ChatRequest, 1000)
        assert e.value.status == status, raw
        assert set(e.value.body()["error"]) == {"message", "type", "param", "code"}
    with pytest.raises(APIError) as e:
        parse_body(b'{"model": "m", "messages": [], "max_tokens": "lots"}', ChatRequest, 1000)
    assert e.value.param == "max_tokens"


def test_parse_body_refuses_text_utf8_cannot_hold_and_hostile_shapes():
    """Issue 23: a lone surrogate is valid JSON but no character (SQLite, UTF-8 logs and responses refuse it): 400
    naming the field, wherever it is (a value, a nested part, a key). Deep nesting is a 400, not a crash."""
    from serve.schemas import FeedbackRequest, MemoryRequest

    for raw, param in [
        (b'{"model": "m", "messages": [{"role": "user", "content": "\\ud800"}]}', "messages.0.content"),
        (
            b'{"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "a\\udfffb"}]}]}',
            "messages.0.content.0.text",
        ),
        (b'{"model": "m", "messages": [], "user": "\\udc00"}', "user"),
        (b'{"model": "m", "messages": [], "\\ud800": 1}', "body"),
    ]:
        with pytest.raises(APIError) as e:
            parse_body(raw, ChatRequest, 10_000)
        assert (e.value.status, e.value.code, e.value.param) == (400, "invalid_unicode", param), raw
    # a proper surrogate pair is one character, and NUL is a character UTF-8 and SQLite hold: both accepted
    ok = parse_body(
        b'{"model": "m", "messages": [{"role": "user", "content": "\\ud83d\\ude00 a\\u0000b"}]}', ChatRequest, 10_000
    )
    assert ok.messages[0].text() == "\U0001f600 a\x00b"
    with pytest.raises(APIError) as e:
        parse_body(b"[" * 5000 + b"]" * 5000, ChatRequest, 100_000)
    assert (e.value.status, e.value.code) == (400, "invalid_json")
    with pytest.raises(APIError) as e:
        parse_body(b'{"user": "a", "fact": "\\ud800"}', MemoryRequest, 1000)
    assert e.value.param == "fact"
    for rating, status in ((True, 422), ([1], 422), ({"x": 1}, 422)):  # JSON true is not one star
        with pytest.raises(APIError) as e:
            parse_body(json.dumps({"response_id": "r", "rating": rating}).encode(), FeedbackRequest, 1000)
        assert e.value.status == status and e.value.param.split(".")[0] == "rating"
    assert parse_body(b'{"response_id": "r", "rating": 4}', FeedbackRequest, 1000).rating == 4


def test_api_keys(tmp_path):
    f = tmp_path / "keys"
    f.write_text("# comment\nsecret-1\n\n  secret-2  \n")
    hashes = load_api_keys(f)
    assert len(hashes) == 2 and "secret-1" not in hashes
    assert authorize("Bearer secret-2", hashes) == key_id("secret-2") != key_id("secret-1")
    assert authorize(None, frozenset()) == "anon"
    for header in (None, "", "Bearer ", "Basic secret-1", "Bearer secret-3"):
        with pytest.raises(APIError) as e:
            authorize(header, hashes)
        assert e.value.status == 401
    f.write_text("# only a comment\n")
    with pytest.raises(ValueError, match="no keys"):
        load_api_keys(f)


def test_rate_limiter_token_bucket():
    now = [0.0]
    rl = RateLimiter(per_minute=3, clock=lambda: now[0])
    assert [rl.allow("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert rl.allow("a") == pytest.approx(20.0)  # 3/min: one token every 20 s
    assert rl.allow("b") == 0.0  # per caller
    now[0] = 20.0
    assert rl.allow("a") == 0.0 and rl.allow("a") > 0
    assert all(RateLimiter(0).allow("x") == 0.0 for _ in range(100))


def test_text_stream_holds_back_partial_stops_and_utf8(tiny_tokenizer):
    tok = tiny_tokenizer
    stop_ids = {tok.im_end_id}
    ids = tok.encode("hello world, the END is near")
    s = TextStream(tok, stop_ids, ["END"])
    out = "".join(s.push([i]) for i in ids)
    assert out + s.flush() == "hello world, the " and s.stopped
    # multi-byte characters split across tokens are never sent half
    ids = tok.encode("héllo ☃ snow") + [tok.im_end_id]
    s = TextStream(tok, stop_ids, [])
    pieces = [s.push([i]) for i in ids]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) + s.flush() == "héllo ☃ snow" and s.n_generated == len(ids)


def _passages(n: int, text: str = "sorted(xs) returns a new list. " * 5) -> list[dict]:
    return [{"doc_id": f"doc-{i}", "title": f"T{i}", "chunk": 0, "text": text, "score": 1.0} for i in range(n)]


def test_augment_fits_context_budget(tiny_tokenizer):
    from models.chat import ChatFormat, encode_prompt
    from serve.retriever import augment

    tok, fmt = tiny_tokenizer, ChatFormat()
    msgs = [{"role": "user", "content": "how do I sort a list?"}]
    plain = encode_prompt(tok, fmt, msgs)
    passages = _passages(3)
    ids, used_msgs, docs, n_facts = augment(tok, fmt, msgs, passages, ["likes python"], budget=10_000)
    assert [d["doc_id"] for d in docs] == ["doc-0", "doc-1", "doc-2"] and n_facts == 1
    assert [m["role"] for m in used_msgs] == ["user"] and "likes python" in used_msgs[0]["content"]
    assert ids == encode_prompt(tok, fmt, used_msgs) and len(ids) > len(plain)
    for budget in range(len(plain) + 10, len(plain) + 200, 7):  # every budget: within it, whole passages first
        ids, used, docs, _ = augment(tok, fmt, msgs, passages, [], budget=budget)
        assert len(ids) <= budget and ids == encode_prompt(tok, fmt, used)
        assert all(d["text"] == passages[0]["text"] for d in docs[:-1])  # only the last one may be cut
        assert used[-1]["content"].endswith("Question: how do I sort a list?") or not docs
    budget = len(plain) + 90
    ids, _, docs, _ = augment(tok, fmt, msgs, passages, [], budget=budget)
    assert len(ids) <= budget and 1 <= len(docs) < 3 and docs[-1]["text"].endswith(" ...")  # cut to fit
    ids, used, docs, n = augment(tok, fmt, msgs, passages, ["x"], budget=len(plain))
    assert ids == plain and used == msgs and docs == [] and n == 0  # no room: plain conversation


def test_augment_puts_passages_with_ids_in_the_last_user_turn(tiny_tokenizer):
    from models.chat import ChatFormat
    from serve.retriever import DOCS_HEADER, augment

    tok, fmt = tiny_tokenizer, ChatFormat()
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "how do I sort a list?"},
    ]
    ids, used, docs, _ = augment(tok, fmt, msgs, _passages(2, "sorted(xs) sorts."), [], budget=10_000)
    assert used[:3] == msgs[:3] and used[-1]["role"] == "user"  # the system message and earlier turns unchanged
    turn = used[-1]["content"]
    assert turn == (
        f"{DOCS_HEADER}\n\n[doc-0] T0\nsorted(xs) sorts.\n\n[doc-1] T1\nsorted(xs) sorts.\n\n"
        "Question: how do I sort a list?"
    )
    text = tok.decode(ids)  # in the chat format: inside the user turn, before the assistant header
    assert text.endswith("<|im_start|>user\n" + turn + "<|im_end|>\n<|im_start|>assistant\n")
    assert text.count("<|im_start|>system") == 1
    # no user turn to ground: the conversation as it was
    only_system = [{"role": "system", "content": "x"}]
    assert augment(tok, fmt, only_system, _passages(1), [], budget=10_000)[2] == []


def test_augment_keeps_the_template_default_system_prompt(smollm2):
    """SmolLM2's template adds its own system prompt when the conversation has none: RAG must not replace it."""
    from models.chat import ChatFormat
    from models.checkpoint import load_tokenizer
    from serve.retriever import augment

    tok, fmt = load_tokenizer(smollm2), ChatFormat.from_checkpoint(smollm2)
    msgs = [{"role": "user", "content": "Where was the Velmora Accord signed?"}]
    default = fmt.render(msgs, add_generation_prompt=True).split("<|im_end|>")[0]
    assert default.startswith("<|im_start|>system\n") and "SmolLM" in default
    passages = _passages(1, "The Velmora Accord was signed in Questbridge.")
    ids, used, docs, _ = augment(tok, fmt, msgs, passages, [], budget=2048)
    text = fmt.render(used, add_generation_prompt=True)
    assert ids == tok.encode(text, allow_special=True)
    assert text.startswith(default + "<|im_end|>") and [d["doc_id"] for d in docs] == ["doc-0"]
    user = text.split("<|im_start|>user\n", 1)[1]
    assert user.index("[doc-0] T0\nThe Velmora Accord") < user.index("Question: Where was the Velmora Accord signed?")
    assert user.endswith("Question: Where was the Velmora Accord signed?<|im_end|>\n<|im_start|>assistant\n")

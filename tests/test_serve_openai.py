"""The OpenAI options a vLLM client uses, through the official ``openai`` client against a real served tiny model:
``n`` (chat and completions, streamed and not), log-probs in OpenAI's shapes (checked against the checkpoint's own
torch model), ``response_format`` through vLLM's structured outputs, ``logit_bias``, ``/v1/embeddings`` (checked
against models/transformer.py hidden states), and a 400 naming every option the server does not honour."""

from __future__ import annotations

import json
import math

import httpx
import pytest

from tests.helpers import SERVE_KEYS

pytestmark = pytest.mark.slow
KEY = SERVE_KEYS[0]


@pytest.fixture(scope="module")
def server(served):
    """The session's one served app (conftest ``served``, API keys on): real Ray Serve, real vLLM CPU engine."""
    return served


def post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(server["base"] + path, json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)


@pytest.fixture(scope="module")
def client(server):
    import openai

    return openai.OpenAI(base_url=server["base"] + "/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def torch_model(tiny_checkpoint):
    from models.checkpoint import load_checkpoint

    return load_checkpoint(tiny_checkpoint)


CHAT = dict(model="tiny", messages=[{"role": "user", "content": "count to three"}], extra_body={"rag": False})


def stream_choices(chunks) -> dict[int, dict]:
    """Streamed chunks -> {index: {"text", "finish", "logprobs" (chat content entries or completion dicts)}}."""
    out: dict[int, dict] = {}
    for ch in chunks:
        for c in ch.choices:
            o = out.setdefault(c.index, {"text": "", "finish": [], "logprobs": []})
            piece = c.delta.content if hasattr(c, "delta") else c.text
            o["text"] += piece or ""
            if c.finish_reason:
                o["finish"].append(c.finish_reason)
            if c.logprobs is not None:
                o["logprobs"].append(c.logprobs)
    return out


def test_n_choices_chat_and_completions_streamed_and_not(client):
    r = client.chat.completions.create(n=3, max_tokens=8, temperature=1.0, seed=11, **CHAT)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert len({c.message.content for c in r.choices}) > 1  # three samples, not one copied
    assert r.usage.completion_tokens <= 24 and r.model_extra["model_version"]
    s = stream_choices(client.chat.completions.create(n=3, max_tokens=8, temperature=1.0, seed=11, stream=True, **CHAT))
    assert sorted(s) == [0, 1, 2]
    assert [s[i]["text"] for i in range(3)] == [c.message.content for c in r.choices]  # seeded: the same samples
    assert all(len(s[i]["finish"]) == 1 for i in range(3))
    # greedy: every choice is the greedy answer
    g = client.chat.completions.create(n=2, max_tokens=6, temperature=0.0, **CHAT)
    one = client.chat.completions.create(max_tokens=6, temperature=0.0, **CHAT)
    assert [c.message.content for c in g.choices] == [one.choices[0].message.content] * 2
    c = client.completions.create(
        model="tiny", prompt="def main():", n=2, max_tokens=5, temperature=0.0, extra_body={"ignore_eos": True}
    )
    assert [x.index for x in c.choices] == [0, 1] and c.usage.completion_tokens == 10
    sc = stream_choices(
        client.completions.create(
            model="tiny",
            prompt="def main():",
            n=2,
            max_tokens=5,
            temperature=0.0,
            stream=True,
            extra_body={"ignore_eos": True},
        )
    )
    assert [sc[i]["text"] for i in (0, 1)] == [x.text for x in c.choices]
    assert [sc[i]["finish"] for i in (0, 1)] == [["length"], ["length"]]


def test_chat_logprobs_match_the_checkpoint_and_stream_the_same(client, torch_model, tiny_checkpoint):
    import torch

    from models.chat import ChatFormat

    model, tok = torch_model
    r = client.chat.completions.create(
        max_tokens=8,
        temperature=0.0,
        logprobs=True,
        top_logprobs=3,
        **{**CHAT, "extra_body": {"rag": False, "ignore_eos": True}},
    )
    content = r.choices[0].logprobs.content
    assert content and len(content) <= r.usage.completion_tokens
    assert bytes(b for e in content for b in e.bytes).decode("utf-8", "replace") == r.choices[0].message.content
    for e in content:
        assert len(e.top_logprobs) == 3 and e.logprob <= 0
        assert [t.logprob for t in e.top_logprobs] == sorted((t.logprob for t in e.top_logprobs), reverse=True)
        assert e.top_logprobs[0].token == e.token and math.isclose(e.top_logprobs[0].logprob, e.logprob)  # greedy
    # the checkpoint's own log-probs of the same tokens
    fmt = ChatFormat.from_checkpoint(tiny_checkpoint)
    prompt = tok.encode(fmt.render(CHAT["messages"], add_generation_prompt=True), allow_special=True)
    ids = [tok.enc.encode_single_token(bytes(e.bytes)) for e in content]
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([prompt + ids]))[0].float(), -1)
    want = [float(lp[len(prompt) - 1 + i, t]) for i, t in enumerate(ids)]
    assert [e.logprob for e in content] == pytest.approx(want, abs=2e-3)
    s = stream_choices(
        client.chat.completions.create(
            max_tokens=8,
            temperature=0.0,
            logprobs=True,
            top_logprobs=3,
            stream=True,
            **{**CHAT, "extra_body": {"rag": False, "ignore_eos": True}},
        )
    )
    streamed = [e for lp_ in s[0]["logprobs"] for e in lp_.content]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in content]
    none = client.chat.completions.create(max_tokens=3, **CHAT)
    assert none.choices[0].logprobs is None  # not asked: none sent


def test_completion_logprobs_shape(client):
    r = client.completions.create(
        model="tiny", prompt="def main():", max_tokens=6, temperature=0.0, logprobs=2, extra_body={"ignore_eos": True}
    )
    lp = r.choices[0].logprobs
    n = len(lp.tokens)
    assert n and len(lp.token_logprobs) == n and len(lp.top_logprobs) == n and len(lp.text_offset) == n
    assert lp.text_offset[0] == 0 and all(b >= a for a, b in zip(lp.text_offset, lp.text_offset[1:]))
    assert all(1 <= len(t) <= 2 for t in lp.top_logprobs)
    assert all(max(t.values()) == pytest.approx(v) for t, v in zip(lp.top_logprobs, lp.token_logprobs))  # greedy
    s = stream_choices(
        client.completions.create(
            model="tiny",
            prompt="def main():",
            max_tokens=6,
            temperature=0.0,
            logprobs=2,
            stream=True,
            extra_body={"ignore_eos": True},
        )
    )
    assert [t for x in s[0]["logprobs"] for t in x.tokens] == lp.tokens
    assert [o for x in s[0]["logprobs"] for o in x.text_offset] == lp.text_offset


def test_response_format_json_is_honoured(client):
    schema = {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}},
        "required": ["ok"],
        "additionalProperties": False,
    }
    free = client.chat.completions.create(max_tokens=40, temperature=0.0, **CHAT)
    with pytest.raises(ValueError):  # the tiny random model does not write JSON by itself
        json.loads(free.choices[0].message.content)
    r = client.chat.completions.create(
        max_tokens=40,
        temperature=0.0,
        response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}},
        **CHAT,
    )
    assert r.choices[0].finish_reason == "stop", r.choices[0].message.content
    out = json.loads(r.choices[0].message.content)
    assert set(out) == {"ok"} and isinstance(out["ok"], bool)
    o = client.chat.completions.create(
        max_tokens=60, temperature=0.7, seed=3, response_format={"type": "json_object"}, **CHAT
    )
    if o.choices[0].finish_reason == "stop":  # a free-form object may run past max_tokens
        assert isinstance(json.loads(o.choices[0].message.content), dict)
    else:
        assert o.choices[0].message.content.lstrip().startswith("{")


def test_logit_bias_is_honoured(client, torch_model):
    _, tok = torch_model
    forced = tok.encode("x")[0]
    r = client.completions.create(
        model="tiny",
        prompt="def main():",
        max_tokens=5,
        temperature=0.0,
        logit_bias={str(forced): 100},
        extra_body={"ignore_eos": True},
    )
    assert r.choices[0].text == tok.decode([forced] * 5)


def test_options_not_honoured_answer_400_naming_them(client, server):
    import openai

    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(max_tokens=3, tools=tools, **CHAT)
    assert e.value.body["param"] == "tools" and "tool parser" in e.value.body["message"]
    for body, param in [
        ({"frobnicate": 1}, "frobnicate"),
        ({"echo": True}, "echo"),
        ({"suffix": "x"}, "suffix"),
        ({"logprobs": 21}, "logprobs"),
        ({"logit_bias": {"99999": 5}}, "logit_bias"),
    ]:
        r = post(server, "/v1/completions", {"model": "tiny", "prompt": "a", "max_tokens": 2, **body})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (body, r.text)
    r = post(server, "/v1/chat/completions", {"model": "tiny", "messages": CHAT["messages"], "top_logprobs": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "top_logprobs"
    # harmless values are accepted: echo false, store false
    ok = post(server, "/v1/completions", {"model": "tiny", "prompt": "a", "max_tokens": 2, "echo": False})
    assert ok.status_code == 200, ok.text


def test_embeddings_are_the_models_pooled_hidden_states(client, server, torch_model):
    import numpy as np
    import torch

    model, tok = torch_model
    r = client.embeddings.create(model="tiny", input=["hello world", "def main():"])  # the client asks for base64
    assert [d.index for d in r.data] == [0, 1] and r.model_extra["model_version"]
    v = np.asarray(r.data[0].embedding)
    assert v.shape == (model.cfg.dim,) and abs(np.linalg.norm(v) - 1) < 1e-4
    ids = tok.encode("hello world")
    with torch.no_grad():
        h = model.hidden_states(torch.tensor([ids]))[0].mean(0)
    assert v == pytest.approx((h / h.norm()).numpy(), abs=1e-4)
    assert r.usage.prompt_tokens == len(ids) + len(tok.encode("def main():"))
    f = post(server, "/v1/embeddings", {"model": "tiny", "input": ids}).json()
    assert f["data"][0]["embedding"] == pytest.approx(list(v), abs=1e-5)  # token ids in, floats out
    for body, param in [({"input": ""}, "input"), ({"input": [], "dimensions": 8}, "dimensions")]:
        bad = post(server, "/v1/embeddings", {"model": "tiny", **body})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == param, bad.text

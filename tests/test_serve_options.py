"""The plain parts behind the OpenAI options and model versions, without Ray or vLLM: option checks, log-prob
shapes, an answer of n choices assembled from generator pieces, model versions and in-place compatibility, embedding
pooling."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from serve.answers import Answer
from serve.detokenize import TextStream
from serve.embeddings import pool
from serve.errors import APIError
from serve.schemas import ChatRequest, CompletionRequest, parse_body
from serve.versions import SwitchError, incompatibilities, model_version


def chat(**kw) -> ChatRequest:
    return parse_body(
        json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}], **kw}).encode(), ChatRequest, 10_000
    )


def test_option_checks_name_the_option():
    for kw, param in [
        ({"tools": []}, "tools"),
        ({"tool_choice": "auto"}, "tool_choice"),
        ({"store": True}, "store"),
        ({"best_of": 3}, "best_of"),
        ({"wat": 1}, "wat"),
    ]:
        with pytest.raises(APIError) as e:
            chat(**kw).check_options()
        assert (e.value.status, e.value.param) == (400, param), kw
    for kw in ({"store": False}, {"tool_choice": "none"}, {"best_of": 2, "n": 2}, {}):
        chat(**kw).check_options()  # harmless values pass
    named = parse_body(
        json.dumps(
            {
                "model": "m",
                "messages": [
                    {"role": "assistant", "content": "a", "tool_calls": None, "refusal": None},
                    {"role": "user", "content": "b", "name": "bob"},
                ],
            }
        ).encode(),
        ChatRequest,
        10_000,
    )
    with pytest.raises(APIError) as e:
        named.check_options()
    assert e.value.param == "messages[1].name"
    assert chat().top_logprobs_k() is None and chat(logprobs=True).top_logprobs_k() == 0
    assert chat(logprobs=True, top_logprobs=5).top_logprobs_k() == 5
    for kw in ({"top_logprobs": 2}, {"logprobs": True, "top_logprobs": 21}):
        with pytest.raises(APIError):
            chat(**kw).top_logprobs_k()
    comp = parse_body(b'{"model": "m", "prompt": "x", "logprobs": 3}', CompletionRequest, 1000)
    assert comp.top_logprobs_k() == 3
    assert chat(logit_bias={"5": -100, "7": 2.5}).bias(10) == {5: -100.0, 7: 2.5}
    for bias in ({"10": 1}, {"a": 1}, {"3": 101}):
        with pytest.raises(APIError) as e:
            chat(logit_bias=bias).bias(10)
        assert e.value.param == "logit_bias"
    assert chat(
        response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}
    ).response_format.schema() == {"type": "object"}
    with pytest.raises(APIError):
        chat(response_format={"type": "json_schema", "json_schema": {"name": "x"}}).response_format.schema()
    with pytest.raises(APIError) as e:  # n is bounded
        chat(n=0)
    assert e.value.status == 422


def test_text_stream_keeps_logprobs_of_text_tokens_only(tiny_tokenizer):
    tok = tiny_tokenizer
    a, b = tok.encode("ab")[0], tok.encode(" c")[0]
    st = TextStream(tok, {tok.im_end_id}, [])
    st.push([a, tok.im_end_id], [[-0.5, [[a, -0.5]]], [-0.1, []]])
    ids, lps = st.take_logprobs()
    assert ids == [a] and lps == [[-0.5, [[a, -0.5]]]]
    st.push([b], [[-0.2, []]])
    assert st.take_logprobs() == ([b], [[-0.2, []]]) and st.take_logprobs() == ([], [])


def test_answer_of_n_choices_from_pieces(tiny_tokenizer):
    tok = tiny_tokenizer
    x, y = tok.encode("x")[0], tok.encode("y")[0]
    ans = Answer(tok, [tok.eot_id, tok.im_end_id], ["STOP"], n=2, chat=True, logprobs=True)
    steps = ans.push({0: ([x], None, [[-1.0, [[x, -1.0], [y, -2.0]]]]), 1: ([y], None, [[-0.5, [[y, -0.5]]]])})
    assert [s[0] for s in steps] == [0, 1] and not ans.done
    ans.push({0: ([tok.im_end_id], "stop", [[-0.1, []]])})
    assert ans.finish == ["stop", None]
    ans.push({1: (tok.encode("STOP more"), None, [[-0.3, []]] * len(tok.encode("STOP more")))})
    assert ans.done and ans.finish == ["stop", "stop"] and ans.stopped_early
    c = ans.choices()
    assert [x["message"]["content"] for x in c] == ["x", "y"]
    lp0 = c[0]["logprobs"]["content"]
    assert lp0 == [
        {
            "token": "x",
            "logprob": -1.0,
            "bytes": list(b"x"),
            "top_logprobs": [
                {"token": "x", "logprob": -1.0, "bytes": list(b"x")},
                {"token": "y", "logprob": -2.0, "bytes": list(b"y")},
            ],
        }
    ]
    # completions: legacy log-prob shape, offsets continue across streamed steps
    comp = Answer(tok, [tok.eot_id], [], n=1, chat=False, logprobs=True)
    s1 = comp.push({0: ([x], None, [[-1.0, [[x, -1.0]]]])})
    s2 = comp.push({0: ([y], "length", [[-2.0, [[y, -2.0]]]])})
    chunks = comp.chunk_choices(s1[0]) + comp.chunk_choices(s2[0])
    assert [c["logprobs"]["text_offset"] for c in chunks if c["logprobs"]] == [[0], [1]]
    assert chunks[-1] == {"index": 0, "text": "", "logprobs": None, "finish_reason": "length"}
    assert comp.choices()[0]["logprobs"] == {
        "tokens": ["x", "y"],
        "token_logprobs": [-1.0, -2.0],
        "top_logprobs": [{"x": -1.0}, {"y": -2.0}],
        "text_offset": [0, 1],
    }


def test_model_version_manifest_or_weights_hash(tiny_checkpoint, tmp_path):
    from pipelines.artifacts import Manifest, manifest_digest

    bare = model_version(str(tiny_checkpoint))
    assert bare.startswith("w-") and len(bare) == 18 and bare == model_version(str(tiny_checkpoint))
    art = tmp_path / "sft"
    m = Manifest.begin("sft", str(art), {})
    shutil.copytree(tiny_checkpoint, art / "model")
    assert model_version(str(art / "model")) == bare  # a running stage: the weights' hash
    m.finish()
    assert model_version(str(art / "model")) == manifest_digest(str(art))[:16]
    nested = art / "checkpoints" / "step1"
    shutil.copytree(tiny_checkpoint, nested)
    assert model_version(str(nested)) == bare  # deeper than <artifact>/model: not the artifact's version


def test_incompatibilities_name_what_differs(tiny_checkpoint, tmp_path):
    same = tmp_path / "same"
    shutil.copytree(tiny_checkpoint, same)
    assert incompatibilities(tiny_checkpoint, same) == []
    cfg = json.loads((same / "config.json").read_text())
    (same / "config.json").write_text(json.dumps({**cfg, "torch_dtype": "bfloat16"}))
    assert incompatibilities(tiny_checkpoint, same) == []  # a dtype is not an architecture
    other = tmp_path / "other"
    shutil.copytree(tiny_checkpoint, other)
    (other / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 9}))
    (other / "tokenizer_config.json").write_text("{}")
    diffs = incompatibilities(tiny_checkpoint, other)
    assert any("num_hidden_layers" in d for d in diffs) and any("tokenizer_config.json" in d for d in diffs)
    broken = tmp_path / "broken"
    shutil.copytree(tiny_checkpoint, broken)
    (broken / "model.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(SwitchError) as e:
        incompatibilities(tiny_checkpoint, broken)
    assert e.value.status == 400


def test_pooling():
    h = torch.tensor([[[1.0, 0.0], [3.0, 4.0], [9.0, 9.0]]])  # (1, 3, 2); the third position is padding
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    assert pool(h, mask, "mean")[0].tolist() == pytest.approx([2**-0.5, 2**-0.5])  # mean (2, 2), unit length
    assert pool(h, mask, "last")[0].tolist() == pytest.approx([0.6, 0.8])  # (3, 4), unit length
    with pytest.raises(ValueError):
        pool(h, mask, "max")

"""SFT data: the ast-built instruction set, bad-line accounting, overlong rule, and packing == padding loss."""

from __future__ import annotations

import ast
import json
from collections import Counter

import pytest
import torch

from models.chat import ChatFormat
from pipelines.conversations import parse_record, read_conversations
from pipelines.judge import parses_as_python, writes_function
from pipelines.sft.data import SftDataConfig, build, run, val_path
from pipelines.sft.evaluate import heldout_answer_loss
from pipelines.sft.rows import Sample, encode_samples, pack_bins, packed_rows, padded_rows, to_sample
from pipelines.train.loop import IGNORE

MODULE = '''
def add(a, b):
    """Return the sum of two numbers a and b."""
    return a + b

def add_copy(a, b):
    """Return the sum of two numbers a and b, again."""
    return a + b

class Box:
    def area(self, scale=1):
        """Compute the area of the box, scaled by a factor."""
        w = self.w * scale
        return w * self.h

    def _hidden(self):
        """A private helper that should be skipped."""
        return 1

def undocumented(x):
    return x
'''


def test_sft_data_from_code(tmp_path):
    src = tmp_path / "code"
    src.mkdir()
    (src / "mod.py").write_text(MODULE)
    (src / "broken.py").write_text("def (:\n")
    cfg = SftDataConfig(from_code=[str(src)], out=str(tmp_path / "set.jsonl"), val_fraction=0.0)
    train, val, counts = build(cfg)
    assert counts["files"] == 2 and counts["files_unparsable"] == 1
    assert counts["skipped_private"] == 1 and counts["skipped_no_docstring"] == 1
    # add_copy has the same normalised code as add: both of its tasks are duplicates
    assert counts["duplicates"] == 2
    assert len(train) == 4 and not val
    write = [ex for ex in train if ex["meta"]["task"] == "write"]
    assert {ex["messages"][1]["content"] for ex in write} == {
        "def add(a, b):\n    return a + b",
        "def area(self, scale=1):\n    w = self.w * scale\n    return w * self.h",
    }
    for ex in write:
        ast.parse(ex["messages"][1]["content"])  # every code answer parses
        assert '"""' not in ex["messages"][1]["content"]
    explain = [ex for ex in train if ex["meta"]["task"] == "explain"]
    assert "Return the sum of two numbers a and b." in {ex["messages"][1]["content"] for ex in explain}
    assert any("def add(a, b)" in ex["messages"][0]["content"] for ex in write)

    stats = run(cfg)
    assert stats["counts"]["train"] == 4
    rows = [json.loads(l) for l in open(cfg.out)]
    assert rows == train
    assert open(val_path(cfg.out)).read() == ""
    with pytest.raises(ValueError, match="already exists"):
        run(cfg)

    # --out DIR: an artifact folder with train.jsonl, val.jsonl and a finished manifest
    from pipelines.artifacts import read_manifest

    folder = run(SftDataConfig(from_code=[str(src)], out=str(tmp_path / "set"), val_fraction=0.0))
    assert folder["out"] == str(tmp_path / "set" / "train.jsonl")
    m = read_manifest(str(tmp_path / "set"))
    assert m["status"] == "finished" and m["counts"]["train"] == 4 and m["inputs"][0]["path"] == str(src)


def test_heldout_split_keeps_a_function_on_one_side(tmp_path):
    cfg = SftDataConfig(from_code=[], out="", val_fraction=0.3, max_examples=400)
    train, val, counts = build(cfg)
    assert val and train and counts["train"] + counts["val"] == 400
    assert 0.15 < len(val) / 400 < 0.45
    assert not {e["meta"]["key"] for e in train} & {e["meta"]["key"] for e in val}


def test_bad_lines_are_counted_not_raised(tmp_path):
    lines = [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
        {"prompt": "p", "response": "r", "system": "s"},
        {"messages": [{"role": "user", "content": "only a question"}]},
        {"messages": [{"role": "wizard", "content": "x"}, {"role": "assistant", "content": "y"}]},
        {"text": "no fields"},
        {"messages": [{"role": "user"}]},
        {"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "y"}]},
        [1, 2],
    ]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(l) for l in lines) + "\n{not json\n\n")
    counts = Counter()
    convs = read_conversations(str(path), counts)
    assert [m for m, _ in convs][1] == [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "p"},
        {"role": "assistant", "content": "r"},
    ]
    assert len(convs) == 2
    assert counts == Counter(
        lines=9,
        bad_no_assistant_turn=1,
        bad_unknown_role=1,
        bad_missing_fields=2,
        bad_bad_content=1,
        bad_not_an_object=1,
        bad_json=1,
    )
    assert parse_record({"prompt": "x"}) == (None, "missing_fields")
    with pytest.raises(FileNotFoundError, match="genloop sft-data"):
        read_conversations(str(tmp_path / "missing.jsonl"), counts)


def test_shift_and_overlong_rule():
    counts = Counter()
    s = to_sample([1, 2, 3, 4, 5], [0, 0, 1, 1, 0], seq_len=8, overlong="cut", counts=counts)
    assert s == Sample([1, 2, 3, 4], [IGNORE, 3, 4, IGNORE])
    cut = to_sample(list(range(10)), [0] * 3 + [1] * 7, seq_len=5, overlong="cut", counts=counts)
    assert cut == Sample([0, 1, 2, 3, 4], [IGNORE, IGNORE, 3, 4, 5])
    assert to_sample(list(range(10)), [0] * 3 + [1] * 7, seq_len=5, overlong="drop", counts=counts) is None
    assert to_sample(list(range(10)), [0] * 8 + [1] * 2, seq_len=5, overlong="cut", counts=counts) is None
    assert counts == Counter(cut_overlong=2, dropped_overlong=1, dropped_no_target=1)


def test_pack_bins_respects_capacity():
    lengths = [5, 9, 3, 7, 2, 8, 1, 4]
    bins = pack_bins(lengths, 10)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 10 for b in bins)
    # first-fit decreasing by hand: 9|8|7|5 open rows, then 4->row of 5, 3->row of 7, 2->row of 8, 1->row of 9
    assert bins == [[1, 6], [5, 4], [3, 2], [0, 7]]


def test_packed_and_padded_give_the_same_loss(tiny_checkpoint, tiny_tokenizer):
    from models.checkpoint import load_checkpoint

    model, tok = load_checkpoint(tiny_checkpoint)
    fmt = ChatFormat.from_checkpoint(tiny_checkpoint)
    convs = [
        [
            {"role": "user", "content": f"question {i} " * (i % 4 + 1)},
            {"role": "assistant", "content": f"def f{i}(x):\n    return x * {i}"},
        ]
        for i in range(7)
    ]
    samples = encode_samples(convs, tok, fmt, seq_len=128, train_on="assistant", overlong="cut", counts=Counter())
    packed = packed_rows(samples, 128, tok.pad_id)
    padded = padded_rows(samples, 128, tok.pad_id)
    assert len(packed["input_ids"]) < len(padded["input_ids"])
    # every answer token appears once in each layout
    assert (packed["labels"] != IGNORE).sum() == (padded["labels"] != IGNORE).sum() > 0
    assert packed["position_ids"][packed["doc_ids"] >= 0].max() + 1 == max(len(s.input_ids) for s in samples)
    assert heldout_answer_loss(model, packed) == pytest.approx(heldout_answer_loss(model, padded), rel=1e-5)
    # without the doc mask / position restart, packing would change the loss: the check can fail
    leaky = {"input_ids": packed["input_ids"], "labels": packed["labels"]}
    assert abs(heldout_answer_loss(model, leaky) - heldout_answer_loss(model, padded)) > 1e-3
    # gradients agree too (what training sees)
    grads = []
    for rows in (packed, padded):
        model.zero_grad()
        t = {k: torch.as_tensor(v) for k, v in rows.items()}
        logits = model(t["input_ids"], position_ids=t.get("position_ids"), doc_ids=t.get("doc_ids"))
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), t["labels"].flatten(), ignore_index=IGNORE).backward()
        grads.append(model.model.layers[0].self_attn.q_proj.weight.grad.clone())
    assert torch.allclose(grads[0], grads[1], atol=1e-6, rtol=1e-4)


def test_parses_as_python():
    assert parses_as_python("def f(x):\n    return x")
    assert parses_as_python("Here:\n```python\nx = 1\n```\nmore")
    assert not parses_as_python("def f(x:\n  return")
    assert not parses_as_python("   ")


def test_writes_function_needs_a_def_that_parses():
    assert writes_function("def f(x):\n    return x")
    assert writes_function("Sure:\n```python\nasync def g():\n    pass\n```")
    assert not writes_function("# a comment that parses\nfrom os import path")  # parses, writes nothing
    assert not writes_function("def f(x):\n    return (")

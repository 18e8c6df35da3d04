"""Preference input: the three JSONL forms, bad lines counted and quarantined (never fatal unless nothing is left),
rendering into pair rows; pref-data's pure parts (code prompts, pairing by judge score)."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from pipelines.prefs.pairs import (
    PrefPair,
    pair_rows,
    parse_pair,
    read_pairs,
    require_pairs,
    side_row,
    split_pairs,
    write_quarantine,
)
from pipelines.prefs.pref_data import Candidate, code_prompt, make_pairs


def test_parse_pair_forms():
    p, why = parse_pair({"prompt": "Q", "chosen": "a", "rejected": "b", "margin": 1.5, "source": "judge"})
    assert why == "" and p.prompt == [{"role": "user", "content": "Q"}] and p.margin == 1.5 and p.source == "judge"
    conv = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}]
    p, why = parse_pair(
        {
            "chosen": conv + [{"role": "assistant", "content": "a"}],
            "rejected": conv + [{"role": "assistant", "content": "b"}],
        }
    )
    assert why == "" and p.prompt == conv and (p.chosen, p.rejected) == ("a", "b")
    # genloop feedback export: messages when present, else the raw prompt text of a plain completion
    p, _ = parse_pair(
        {"prompt": "<|im_start|>user\nQ", "chosen": "a", "rejected": "b", "messages": conv, "source": "user"}
    )
    assert p.prompt == conv and p.source == "user"
    p, _ = parse_pair({"prompt": "def f(", "chosen": "x)", "rejected": "y)", "messages": None, "source": "ratings"})
    assert p.prompt == "def f("


@pytest.mark.parametrize(
    "obj,reason",
    [
        ([1, 2], "not_an_object"),
        ({"prompt": "Q", "chosen": "a"}, "missing_fields"),
        ({"chosen": "a", "rejected": "b"}, "missing_fields"),
        ({"prompt": "Q", "chosen": 3, "rejected": "b"}, "answer_not_a_string"),
        ({"prompt": "Q", "chosen": "a", "rejected": "a"}, "same_answers"),
        ({"prompt": "Q", "chosen": " ", "rejected": "a"}, "empty_answer"),
        ({"prompt": "Q", "chosen": "a", "rejected": "b", "margin": "big"}, "bad_margin"),
        (
            {
                "chosen": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "a"}],
                "rejected": [{"role": "user", "content": "R"}, {"role": "assistant", "content": "b"}],
            },
            "prompts_differ",
        ),
        (
            {"chosen": [{"role": "user", "content": "Q"}], "rejected": [{"role": "user", "content": "Q"}]},
            "no_final_assistant_turn",
        ),
        ({"chosen": [{"role": "bot", "content": "Q"}], "rejected": []}, "bad_messages"),
    ],
)
def test_parse_pair_reasons(obj, reason):
    assert parse_pair(obj) == (None, reason)


def test_read_pairs_counts_quarantines_and_dedups(tmp_path):
    f = tmp_path / "prefs.jsonl"
    good = {"prompt": "Q", "chosen": "a", "rejected": "b"}
    f.write_text(
        "\n".join(
            [
                json.dumps(good),
                "{not json",
                json.dumps({"prompt": "Q"}),
                json.dumps(good),
                json.dumps({**good, "chosen": "c"}),
                "",
            ]
        )
        + "\n"
    )
    counts, quarantine = Counter(), []
    pairs = read_pairs(str(f), counts, quarantine)
    assert len(pairs) == 2 and counts["duplicates"] == 1 and counts["lines"] == 5
    assert counts["bad_not_json"] == 1 and counts["bad_missing_fields"] == 1
    assert [(q["line"], q["reason"]) for q in quarantine] == [(2, "not_json"), (3, "missing_fields")]
    path = write_quarantine(str(tmp_path / "out"), quarantine)
    assert len(open(path).read().splitlines()) == 2


def test_nothing_usable_is_one_clear_error(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text("garbage\n" + json.dumps({"text": "no pair"}) + "\n")
    counts: Counter = Counter()
    pairs = read_pairs(str(f), counts, [])
    with pytest.raises(ValueError, match=r"bad.jsonl: no usable preference pair.*\"chosen\", \"rejected\""):
        require_pairs(pairs, str(f), counts)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_pairs(str(tmp_path / "missing.jsonl"), Counter(), [])


def test_split_keeps_a_prompts_pairs_together():
    pairs = [PrefPair([{"role": "user", "content": f"q{i % 10}"}], f"a{i}", f"b{i}") for i in range(100)]
    train, val = split_pairs(pairs, 0.3, seed=1)
    assert len(train) + len(val) == 100 and 0 < len(val) < 100
    assert not {p.prompt_key() for p in train} & {p.prompt_key() for p in val}


def test_side_row_labels_next_answer_tokens():
    ids, labels = side_row([5, 6, 7, 8], [0, 0, 1, 1], seq_len=6, pad_id=0)
    assert ids.tolist() == [5, 6, 7, 8, 0, 0]
    assert labels.tolist() == [-100, 7, 8, -100, -100, -100]


def test_pair_rows_render_with_the_chat_template(tiny_checkpoint):
    from models.chat import ChatFormat, encode_chat
    from models.checkpoint import load_tokenizer

    tok, fmt = load_tokenizer(tiny_checkpoint), ChatFormat.from_checkpoint(tiny_checkpoint)
    pairs = [
        PrefPair([{"role": "user", "content": "Write `def f(x)`."}], "def f(x):\n    return x", "no", 0.5),
        PrefPair([{"role": "user", "content": "long " * 200}], "a", "b"),
    ]
    counts: Counter = Counter()
    rows = pair_rows(pairs, tok, fmt, 64, counts)
    assert counts["dropped_too_long"] == 1 and rows["chosen_ids"].shape == (1, 64)
    want, mask = encode_chat(tok, fmt, [*pairs[0].prompt, {"role": "assistant", "content": pairs[0].chosen}])
    assert rows["chosen_ids"][0, : len(want)].tolist() == want
    assert (rows["chosen_ids"][0, len(want) :] == tok.pad_id).all() and rows["margin"].tolist() == [0.5]
    answer = [t for t, m in zip(want, mask) if m]
    assert [t for t in rows["chosen_labels"][0].tolist() if t != -100] == answer


def test_code_prompt_keeps_code_writing_requests_only():
    write = {
        "messages": [
            {"role": "user", "content": "Implement `def f(x)` in Python. Doubles x."},
            {"role": "assistant", "content": "def f(x):\n    return 2 * x"},
        ]
    }
    msgs, ref, why = code_prompt(write)
    assert why == "" and msgs == write["messages"][:1] and ref.startswith("def f")
    explain = {
        "messages": [
            {"role": "user", "content": "What does this do?\n```python\nx = 1\n```"},
            {"role": "assistant", "content": "Sets x."},
        ]
    }
    assert code_prompt(explain)[2] == "not_code_writing"
    assert code_prompt({"text": "x"})[2] == "not_a_conversation"


def test_make_pairs_needs_a_margin_and_prefers_policy_samples_on_ties():
    cands = [
        Candidate("good", 1.0, "policy"),
        Candidate("ok", 0.75, "policy"),
        Candidate("bad", 0.0, "policy"),
        Candidate("bad", 0.0, "policy"),
        Candidate("ref", 1.0, "reference"),
    ]
    pairs = make_pairs(cands, min_margin=0.5, max_pairs=3)
    assert [(c.text, r.text) for c, r in pairs] == [("good", "bad")]  # 'ok' is within the margin; 'bad' once
    assert [(c.text, r.text) for c, r in make_pairs(cands, 0.25, 3)] == [("good", "bad"), ("good", "ok")]
    same = [Candidate("a", 0.5, "policy"), Candidate("b", 0.5, "policy")]
    assert make_pairs(same, 0.25, 2) == []
    ref_best = [Candidate("x", 0.0, "policy"), Candidate("ref", 1.0, "reference")]
    assert [(c.origin, r.text) for c, r in make_pairs(ref_best, 0.25, 2)] == [("reference", "x")]

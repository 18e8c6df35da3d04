"""Invented facts and answer accuracy with RAG on vs off (``serve.fact_eval``, ``genloop rag-eval --facts --model``):
the facts are deterministic and unknowable, the counting and the Wilson intervals match a hand count, and the command
runs a checkpoint (the `tiny` one: wiring only) on prompts built from the local store. No Ray."""

from __future__ import annotations

import argparse
import json
import math
import re

import pytest

from serve.fact_eval import answer_accuracy, format_accuracy, invented_facts, is_right


def test_invented_facts_are_deterministic_unknowable_and_answered_by_their_document():
    a, b = invented_facts(12, seed=3), invented_facts(12, seed=3)
    assert a == b and invented_facts(12, seed=4).documents != a.documents
    assert len(a.questions) == 12 and len(a.documents) == 2 * (12 + 12)  # each fact + sibling, 12 more facts
    assert len(invented_facts(5, seed=0, distractors=0).documents) == 10
    ids = [d["id"] for d in a.documents]
    assert len(set(ids)) == len(ids)
    docs = {d["id"]: d for d in a.documents}
    for q in a.questions:
        assert q["answer"].casefold() not in q["question"].casefold()
        assert q["answer"] in docs[q["doc"]]["text"]
        if not q["answer"].isdigit():  # an invented word: in its own document and nowhere else
            assert [d for d in a.documents if q["answer"] in d["text"]] == [docs[q["doc"]]]
        # the sibling distractor: same subject (title), another fact
        siblings = [d for d in a.documents if d["title"] == docs[q["doc"]]["title"] and d["id"] != q["doc"]]
        assert len(siblings) == 1 and q["answer"] not in siblings[0]["text"]
    assert len({q["question"] for q in a.questions}) == 12
    with pytest.raises(ValueError):
        invented_facts(0)


def test_answer_accuracy_matches_a_hand_count():
    qs = [{"question": f"q{i}", "doc": f"d{i}", "answer": f"Ans{i}"} for i in range(10)]
    qs.append({"question": "no answer to check", "doc": "x"})  # left out: nothing to compare with

    def fake(question: str, rag: bool) -> tuple[str, list[str]]:
        i = int(question[1:])
        if rag:  # right for i = 0..6 (one in lower case), the document retrieved for all but 8 and 9
            text = f"it is ans{i}." if i == 3 else (f"It is Ans{i}." if i < 7 else "I do not know.")
            return text, [f"d{i}", "other"] if i < 8 else ["other"]
        return ("Ans4 maybe" if i == 4 else "no idea"), []  # right once

    res = answer_accuracy(qs, fake, show=2)
    on, off = res["rag_on"], res["rag_off"]
    assert (on["k"], on["n"], on["retrieved"]) == (7, 10, 8) and (off["k"], off["n"], off["retrieved"]) == (1, 10, 0)
    assert on["accuracy"] == pytest.approx(0.7) and off["accuracy"] == pytest.approx(0.1)
    assert [m["question"] for m in on["misses"]] == ["q7", "q8", "q9"] and len(off["misses"]) == 9

    def wilson(k, n, z=1.959964):  # by hand: (p + z^2/2n +- z sqrt(p(1-p)/n + z^2/4n^2)) / (1 + z^2/n)
        p = k / n
        c, h = p + z * z / (2 * n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
        return (c - h) / (1 + z * z / n), (c + h) / (1 + z * z / n)

    assert (on["lo"], on["hi"]) == pytest.approx(wilson(7, 10), abs=1e-4)
    assert (off["lo"], off["hi"]) == pytest.approx(wilson(1, 10), abs=1e-4)
    assert (on["lo"], on["hi"]) == pytest.approx((0.3968, 0.8922), abs=1e-3)  # published value for 7/10
    assert res["samples"] == [
        {"question": "q0", "answer": "Ans0", "rag_on": "It is Ans0.", "rag_off": "no idea"},
        {"question": "q1", "answer": "Ans1", "rag_on": "It is Ans1.", "rag_off": "no idea"},
    ]
    lines = format_accuracy(res)
    assert re.search(r"RAG on\s+7/10\s+0\.700\s+\[0\.397, 0\.892\]\s+8/10", lines[1]), lines[1]
    assert re.search(r"RAG off\s+1/10\s+0\.100", lines[2]), lines[2]
    assert is_right("The town is QUESTBRIDGE.", "Questbridge") and not is_right("Quest bridge", "Questbridge")
    with pytest.raises(ValueError, match="answer"):
        answer_accuracy([{"question": "q", "doc": "d"}], fake)


def test_rag_eval_with_facts_and_a_checkpoint_runs_here(tmp_path, tiny_checkpoint, capsys):
    """Wiring on the random `tiny` model (its answers are noise): the facts go into the store, the prompt with RAG
    on holds the retrieved documents (so it finds the fact's one), RAG off holds none, the counts add up."""
    from cluster.commands import rag_eval as cmd

    parser = argparse.ArgumentParser()
    cmd.register(parser.add_subparsers())
    out = tmp_path / "r.json"
    args = parser.parse_args(
        ["rag-eval", "--store", str(tmp_path / "store"), "--facts", "6", "--seed", "1", "--k", "3"]
        + ["--model", str(tiny_checkpoint), "--max-tokens", "3", "--show-answers", "6", "--json", str(out)]
    )
    assert cmd.run(args) == 0
    printed = capsys.readouterr().out
    assert "added 24 fact documents" in printed and "RAG on" in printed and "RAG off" in printed
    res = json.loads(out.read_text())
    on, off = res["answers"]["rag_on"], res["answers"]["rag_off"]
    assert on["n"] == off["n"] == 6 and off["retrieved"] == 0
    # the prompt held what the store ranks first: as many hits as BM25's recall@3 on the same questions
    assert on["retrieved"] == round(res["results"]["lexical"]["recall@3"] * 6) and on["retrieved"] >= 5
    samples = res["answers"]["samples"]  # every answer, recounted by hand
    assert [s["question"] for s in samples] == [q["question"] for q in invented_facts(6, seed=1).questions]
    assert on["k"] == sum(s["answer"].lower() in s["rag_on"].lower() for s in samples)
    assert off["k"] == sum(s["answer"].lower() in s["rag_off"].lower() for s in samples)

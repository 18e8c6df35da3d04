"""Feedback store and export: what the reward stage reads, checked against hand-made records."""

from __future__ import annotations

import argparse
import json

import pytest

from serve.feedback import FeedbackError, FeedbackStore, NotFound, rating_score


def test_rating_score_scale():
    assert [rating_score(x) for x in ("up", "DOWN", 1, 2, 3, 4, 5)] == [1.0, -1.0, -1.0, -0.5, 0.0, 0.5, 1.0]
    for bad in (0, 6, 2.5, True, "meh", None):
        with pytest.raises(FeedbackError):
            rating_score(bad)


def test_feedback_export_round_trip(tmp_path, capsys):
    from cluster.commands.feedback import run as run_export

    db = tmp_path / "feedback.db"
    fs = FeedbackStore(db)
    msgs = [{"role": "user", "content": "hi"}]
    p = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    fs.record_response("r1", "m", p, "Hello!", msgs)
    fs.record_response("r2", "m", p, "go away", msgs)
    fs.record_response("r3", "m", "other prompt", "x", None)
    fs.rate("r1", "up")
    fs.rate("r2", 1)
    fs.rate("r3", 4)
    fs.prefer("r1", "r2")
    with pytest.raises(NotFound):
        fs.rate("nope", "up")
    with pytest.raises(FeedbackError, match="different prompts"):
        fs.prefer("r1", "r3")
    with pytest.raises(FeedbackError, match="same response"):
        fs.prefer("r1", "r1")
    out = tmp_path / "out" / "prefs.jsonl"
    assert run_export(argparse.Namespace(store=str(db), out=str(out), ratings_out=None)) == 0
    assert "1 preference pairs" in capsys.readouterr().out  # the rating-derived pair duplicates the explicit one
    prefs = [json.loads(ln) for ln in out.read_text().splitlines()]
    assert prefs == [{"prompt": p, "chosen": "Hello!", "rejected": "go away", "messages": msgs, "source": "user"}]
    ratings = [json.loads(ln) for ln in (tmp_path / "out" / "prefs.ratings.jsonl").read_text().splitlines()]
    assert [(r["response"], r["rating"], r["score"]) for r in ratings] == [("Hello!", "up", 1.0),
                                                                           ("go away", 1, -1.0), ("x", 4, 0.5)]
    # ratings alone make pairs too; the store is durable across reopen
    fs2 = FeedbackStore(db)
    fs2.record_response("r4", "m", p, "Hi there", msgs)
    fs2.rate("r4", 5)
    rows = fs2.preference_rows()
    assert {"prompt": p, "chosen": "Hi there", "rejected": "go away", "messages": msgs, "source": "ratings"} in rows
    with pytest.raises(FileNotFoundError):
        run_export(argparse.Namespace(store=str(tmp_path / "none.db"), out=str(out), ratings_out=None))


def test_responses_are_batched_flushed_before_a_rating_and_kept_when_the_store_fails(tmp_path):
    """Many responses reach the store in one call per interval; flush() leaves nothing pending; a failed call keeps
    its batch for the next try, in order."""
    import asyncio

    from serve.feedback import ResponseBatcher

    fs = FeedbackStore(tmp_path / "feedback.db")
    calls: list[int] = []
    fail = [True]

    async def send(batch):
        await asyncio.sleep(0.01)
        if fail[0]:
            fail[0] = False
            raise ConnectionError("store replica down")
        calls.append(len(batch))
        fs.record_responses(batch)

    async def scenario():
        b = ResponseBatcher(send, interval_s=0.05)
        for i in range(5):
            b.add(response_id=f"r{i}", model="m", prompt="p", response=f"answer {i}", messages=None)
        await asyncio.sleep(0.1)  # the timed flush ran and failed: the batch is kept
        assert len(b.pending) == 5 and calls == []
        b.add(response_id="r5", model="m", prompt="p", response="answer 5", messages=[{"role": "user", "content": "q"}])
        await b.flush()  # what a rating does first
        assert b.pending == [] and calls == [6]
        await asyncio.sleep(0.1)  # the timer started by add() finds nothing left to send
        assert calls == [6]

    asyncio.run(scenario())
    assert fs.response("r0")["response"] == "answer 0"
    assert fs.response("r5")["messages"] == [{"role": "user", "content": "q"}]
    fs.rate("r5", "up")  # found: recorded before the rating

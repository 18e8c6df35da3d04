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
    assert prefs == [
        {
            "prompt": p,
            "chosen": "Hello!",
            "rejected": "go away",
            "messages": msgs,
            "source": "user",
            "model_version": None,
            "chosen_model_version": None,
            "rejected_model_version": None,
        }
    ]
    ratings = [json.loads(ln) for ln in (tmp_path / "out" / "prefs.ratings.jsonl").read_text().splitlines()]
    assert [(r["response"], r["rating"], r["score"]) for r in ratings] == [
        ("Hello!", "up", 1.0),
        ("go away", 1, -1.0),
        ("x", 4, 0.5),
    ]
    # ratings alone make pairs too; the store is durable across reopen
    fs2 = FeedbackStore(db)
    fs2.record_response("r4", "m", p, "Hi there", msgs)
    fs2.rate("r4", 5)
    rows = fs2.preference_rows()
    assert {
        "prompt": p,
        "chosen": "Hi there",
        "rejected": "go away",
        "messages": msgs,
        "source": "ratings",
        "model_version": None,
        "chosen_model_version": None,
        "rejected_model_version": None,
    } in rows
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


def test_text_sqlite_cannot_hold_is_made_storable_and_a_malformed_record_skipped(tmp_path):
    """Issue 23: a lone UTF-16 surrogate (valid JSON, no character) made SQLite refuse the whole batch. The store now
    keeps such text with U+FFFD in its place and skips a malformed record, recording the rest of its batch."""
    fs = FeedbackStore(tmp_path / "feedback.db")
    msgs = [{"role": "user", "content": "hi \ud800 there"}]
    n = fs.record_responses(
        [
            {"response_id": "r0", "model": "m", "prompt": "p", "response": "fine", "messages": None},
            {"response_id": "bad", "model": "m", "prompt": "p \udc00", "response": "x\ud83d", "messages": msgs},
            {"response_id": 7, "model": "m", "prompt": "p", "response": "id is no string"},
            {"response_id": "nokeys"},
            {
                "response_id": "r1",
                "model": "m",
                "prompt": "p",
                "response": "also fine",
                "messages": None,
                "model_version": "v1",
            },
        ]
    )
    assert n == 3
    bad = fs.response("bad")
    assert "\ufffd" in bad["prompt"] and "\ufffd" in bad["response"] and "\ufffd" in bad["messages"][0]["content"]
    assert fs.response("nokeys") is None and fs.response("r1")["model_version"] == "v1"
    fs.rate("bad", "up")
    fs.rate("r1", "down")
    with pytest.raises(NotFound):  # an id no response can have: not found, not a crash
        fs.rate("chatcmpl-\ud800", "up")
    out = fs.export(tmp_path / "prefs.jsonl")
    assert out["ratings"] == 2
    ratings = [json.loads(ln) for ln in (tmp_path / "prefs.ratings.jsonl").read_text(encoding="utf-8").splitlines()]
    assert sorted(r["score"] for r in ratings) == [-1.0, 1.0]


def test_a_record_the_store_refuses_never_blocks_its_batch_nor_later_ones(tmp_path):
    """The batcher's side of issue 23: a batch the store refuses for its data is sent again one record at a time;
    the refused record is dropped (counted), the others recorded, and later flushes (before every rating) succeed.
    A store that is unreachable meanwhile keeps the rest for the next try."""
    import asyncio

    from serve.feedback import ResponseBatcher

    fs = FeedbackStore(tmp_path / "feedback.db")
    down = [False]
    sent: list[list[str]] = []

    async def send(batch):
        sent.append([r["response_id"] for r in batch])
        if down[0]:
            raise ConnectionError("store replica down")
        if any(r["response_id"].startswith("poison") for r in batch):
            raise UnicodeEncodeError("utf-8", "\ud800", 0, 1, "surrogates not allowed")  # what SQLite raised
        fs.record_responses(batch)

    def rec(rid: str) -> dict:
        return {"response_id": rid, "model": "m", "prompt": "p", "response": f"answer {rid}", "messages": None}

    async def scenario():
        b = ResponseBatcher(send, interval_s=60)
        for rid in ("a", "poison-1", "b"):
            b.add(**rec(rid))
        await b.flush()  # no error: the poison is dropped, the others recorded
        assert b.pending == [] and b.rejected == 1
        assert sent == [["a", "poison-1", "b"], ["a"], ["poison-1"], ["b"]]
        b.add(**rec("c"))
        await b.flush()  # later batches are not blocked
        assert sent[-1] == ["c"] and b.pending == []
        # unreachable half way through the one-by-one sends: that record and the rest are kept, the error raised
        for rid in ("d", "poison-2", "e"):
            b.add(**rec(rid))
        real_send, once = b.send, [True]

        async def flaky(batch):
            if batch == [rec("poison-2")] and once[0]:
                down[0], once[0] = True, False
            return await real_send(batch)

        b.send = flaky
        with pytest.raises(ConnectionError):
            await b.flush()
        assert [r["response_id"] for r in b.pending] == ["poison-2", "e"]
        down[0] = False
        await b.flush()
        assert b.pending == [] and b.rejected == 2

    asyncio.run(scenario())
    assert [fs.response(r) is not None for r in ("a", "b", "c", "d", "e")] == [True] * 5
    assert fs.response("poison-1") is None
    fs.rate("e", "up")


CHAT = "<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n"


def versioned_store(path) -> FeedbackStore:
    """Answers of two model versions to two prompts, rated and compared (one preference across the versions)."""
    fs = FeedbackStore(path)
    for q in ("sort a list", "reverse a string"):
        msgs = [{"role": "user", "content": q}]
        for v, tag in (("v1", "old"), ("v2", "new")):
            for k, quality in (("good", "up"), ("bad", "down")):
                rid = f"{v}-{q.split()[0]}-{k}"
                fs.record_response(rid, "m", CHAT.format(q=q), f"{tag} {k} answer to {q}", msgs, model_version=v)
                fs.rate(rid, quality)
    fs.prefer("v2-sort-good", "v2-sort-bad")  # within v2
    fs.prefer("v2-reverse-good", "v1-reverse-good")  # across versions: in no single version's export
    return fs


def test_export_by_model_version_keeps_one_versions_ratings_and_pairs(tmp_path):
    from collections import Counter

    from pipelines.prefs.pairs import read_pairs

    fs = versioned_store(tmp_path / "feedback.db")
    assert fs.versions() == {"v1": 4, "v2": 4} and fs.response("v1-sort-good")["model_version"] == "v1"
    ratings = fs.rating_rows("v1")
    assert [(r["response"], r["score"], r["model_version"]) for r in ratings] == [
        ("old good answer to sort a list", 1.0, "v1"),
        ("old bad answer to sort a list", -1.0, "v1"),
        ("old good answer to reverse a string", 1.0, "v1"),
        ("old bad answer to reverse a string", -1.0, "v1"),
    ]
    v1 = fs.preference_rows("v1")
    assert [(r["chosen"], r["rejected"], r["source"], r["model_version"]) for r in v1] == [
        ("old good answer to sort a list", "old bad answer to sort a list", "ratings", "v1"),
        ("old good answer to reverse a string", "old bad answer to reverse a string", "ratings", "v1"),
    ]
    v2 = fs.preference_rows("v2")
    assert [(r["chosen"], r["source"]) for r in v2] == [
        ("new good answer to sort a list", "user"),
        ("new good answer to reverse a string", "ratings"),
    ]
    assert all(r["chosen_model_version"] == r["rejected_model_version"] == "v2" for r in v2)
    every = fs.preference_rows()
    cross = [r for r in every if r["chosen_model_version"] != r["rejected_model_version"]]
    # the explicit cross-version preference, plus rating-derived pairs of an up-rated and a down-rated answer of
    # the same prompt from the two versions (2 prompts x 2 directions)
    assert len(cross) == 5 and all(r["model_version"] is None for r in cross)
    assert ("new good answer to reverse a string", "old good answer to reverse a string") in [
        (r["chosen"], r["rejected"]) for r in cross
    ]
    assert len(every) == len(v1) + len(v2) + len(cross)
    assert len(fs.rating_rows()) == 8 and fs.rating_rows("v3") == []
    # the export is what `genloop reward --data` reads: every line a valid pair, none quarantined
    out = fs.export(tmp_path / "v1" / "prefs.jsonl", model_version="v1")
    assert (out["preferences"], out["ratings"], out["model_version"]) == (2, 4, "v1")
    counts, quarantine = Counter(), []
    pairs = read_pairs(out["out"], counts, quarantine)
    assert len(pairs) == 2 and quarantine == [] and pairs[0].prompt == [{"role": "user", "content": "sort a list"}]
    with pytest.raises(FeedbackError, match=r"'v9'.*v1 \(4 responses\), v2 \(4 responses\)"):
        fs.export(tmp_path / "x.jsonl", model_version="v9")


def test_cli_export_model_version(tmp_path, capsys):
    from cluster.cli import main

    versioned_store(tmp_path / "feedback.db")
    out = tmp_path / "exp" / "prefs-v2.jsonl"
    assert (
        main(
            ["feedback", "export", "--store", str(tmp_path / "feedback.db"), "--out", str(out), "--model-version", "v2"]
        )
        == 0
    )
    assert "wrote 2 preference pairs" in capsys.readouterr().out
    assert {json.loads(ln)["model_version"] for ln in out.read_text().splitlines()} == {"v2"}
    ratings = [json.loads(ln) for ln in (tmp_path / "exp" / "prefs-v2.ratings.jsonl").read_text().splitlines()]
    assert len(ratings) == 4 and {r["model_version"] for r in ratings} == {"v2"}
    assert (
        main(
            [
                "feedback",
                "export",
                "--store",
                str(tmp_path / "feedback.db"),
                "--out",
                str(out),
                "--model-version",
                "nope",
            ]
        )
        == 1
    )
    assert "versions recorded: v1 (4 responses), v2 (4 responses)" in capsys.readouterr().err
    assert main(["feedback", "export", "--store", str(tmp_path / "feedback.db"), "--out", str(out)]) == 0
    # every version: v1's 2 pairs, v2's 2, and the 5 across versions (see the test above)
    assert "wrote 9 preference pairs" in capsys.readouterr().out and len(out.read_text().splitlines()) == 9


def test_a_store_from_before_versions_is_migrated_in_place(tmp_path):
    import sqlite3

    db = tmp_path / "feedback.db"
    with sqlite3.connect(db) as c:  # the schema genloop wrote before responses named their model version
        c.execute(
            "CREATE TABLE responses (id TEXT PRIMARY KEY, model TEXT, prompt TEXT, messages TEXT, "
            "response TEXT, created REAL)"
        )
        c.execute(
            "CREATE TABLE feedback (id TEXT PRIMARY KEY, kind TEXT, response_id TEXT, rejected_id TEXT, "
            "rating TEXT, score REAL, who TEXT, created REAL)"
        )
        c.execute("INSERT INTO responses VALUES ('old', 'm', 'p', NULL, 'an old answer', 1.0)")
        c.execute("INSERT INTO feedback VALUES ('fb-1', 'rating', 'old', NULL, '\"up\"', 1.0, '', 2.0)")
    fs = FeedbackStore(db)
    with sqlite3.connect(db) as c:
        assert "model_version" in [r[1] for r in c.execute("PRAGMA table_info(responses)")]
    assert fs.response("old")["model_version"] is None
    fs.record_responses(
        [
            {
                "response_id": "new",
                "model": "m",
                "prompt": "p",
                "response": "a new answer",
                "messages": None,
                "model_version": "abc123",
            }
        ]
    )  # what the ingress's batcher sends
    fs.rate("new", "down")
    assert fs.versions() == {None: 1, "abc123": 1}
    assert [r["response"] for r in fs.rating_rows("abc123")] == ["a new answer"]
    assert [(r["response"], r["model_version"]) for r in fs.rating_rows()] == [
        ("an old answer", None),
        ("a new answer", "abc123"),
    ]
    assert fs.preference_rows()[0]["chosen_model_version"] is None and fs.preference_rows("abc123") == []
    FeedbackStore(db)  # opening a migrated store again changes nothing
    assert fs.versions() == {None: 1, "abc123": 1}

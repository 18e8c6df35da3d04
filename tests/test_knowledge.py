"""Knowledge store, memory store, chunking and the bulk-load CLI: plain SQLite, no Ray."""

from __future__ import annotations

import argparse
import json
import sqlite3

import pytest

from serve.knowledge import KnowledgeError, KnowledgeStore, chunk_text, fts_query, store_path
from serve.memory import MemoryStore, MemoryStoreError, namespace


def test_chunk_text_bounds_overlap_and_boundaries():
    text = " ".join(f"w{i:03d}" for i in range(200))  # 200 words of 4 chars + spaces = 999 chars
    chunks = chunk_text(text, size=100, overlap=20)
    assert all(len(c) <= 100 for c in chunks)
    assert all(not c.startswith(" ") and c.split()[0].startswith("w") for c in chunks)  # cut at word boundaries
    words = [c.split() for c in chunks]
    assert [w for w in words[0]] == text.split()[: len(words[0])]
    for a, b in zip(words, words[1:]):
        assert b[0] in a  # consecutive chunks overlap
    assert words[-1][-1] == "w199"
    covered = set(w for ws in words for w in ws)
    assert covered == set(text.split())
    assert chunk_text("short", 100, 10) == ["short"]
    with pytest.raises(KnowledgeError):
        chunk_text("x", 10, 10)


def test_chunk_text_prefers_paragraph_breaks():
    text = "a" * 70 + "\n\n" + "b" * 70
    assert chunk_text(text, size=100, overlap=0) == ["a" * 70, "b" * 70]


def test_fts_query_quotes_every_word():
    assert fts_query('What is "json" OR NEAR(x)?') == '"what" OR "is" OR "json" OR "or" OR "near" OR "x"'
    assert fts_query("  ?! ") == ""


def test_store_search_replace_delete_and_durability(tmp_path):
    s = KnowledgeStore(tmp_path, chunk_chars=200, chunk_overlap=20)
    assert s.path == tmp_path / "knowledge.db" and store_path(tmp_path / "k.db") == tmp_path / "k.db"
    s.add("cats", "Cats are small felines that purr and chase mice.", title="Cats")
    s.add("json", "The json module parses JSON text: json.loads turns a string into Python objects.", title="JSON")
    s.add("zz", "Nothing relevant here about weather and rain.", title="Weather")
    hits = s.search("how do I parse json text?", k=2)
    assert hits[0].doc_id == "json" and hits[0].title == "JSON" and hits[0].score > 0
    assert all(h.doc_id != "cats" for h in hits)
    assert s.search('"; DROP TABLE chunks; --', k=3) == []  # FTS syntax and SQL are inert
    r = s.add("json", "Completely different text about turtles.", title="Turtles")
    assert r["replaced"] is True and s.count() == 3
    assert [h.doc_id for h in s.search("loads", k=3)] == []  # the old text is gone (the id "json" is still a path)
    assert s.search("turtles", 1)[0].title == "Turtles"
    assert s.delete("cats") is True and s.delete("cats") is False
    s.close()
    again = KnowledgeStore(tmp_path)  # reopened: what was written is there
    assert again.count() == 2 and again.get("json")["title"] == "Turtles" and again.get("cats") is None
    assert again.search("turtles", 1)[0].doc_id == "json"


def test_store_rejects_bad_documents_and_keeps_old_ones(tmp_path):
    s = KnowledgeStore(tmp_path / "k.db", max_document_chars=50)
    s.add("keep", "kept text")
    with pytest.raises(KnowledgeError, match="over the limit of 50"):
        s.add("keep", "x" * 51)
    with pytest.raises(KnowledgeError, match="empty"):
        s.add("keep", "   ")
    assert s.search("kept", 1)[0].doc_id == "keep"
    auto = s.add(None, "no id given")
    assert auto["id"].startswith("doc-") and s.add(None, "no id given")["id"] == auto["id"]


def test_memory_is_scoped_by_namespace(tmp_path):
    m = MemoryStore(tmp_path / "memory.db")
    a, b = namespace("k1", "alice"), namespace("k1", "bob")
    other_key_alice = namespace("k2", "alice")
    m.add(a, "alice likes green tea")
    m.add(a, "alice lives in Oslo")
    m.add(b, "bob likes coffee")
    assert m.search(a, "what tea do I like", k=1) == ["alice likes green tea"]
    assert set(m.search(a, "unrelated words", k=5)) == {"alice likes green tea", "alice lives in Oslo"}
    assert m.search(b, "tea", k=5) == ["bob likes coffee"]  # bob's own fact only, never alice's
    assert m.list(other_key_alice) == [] and m.search(other_key_alice, "tea", 3) == []
    fid = m.list(a)[0]["id"]
    assert m.delete(b, fid) is False and m.delete(a, fid) is True and len(m.list(a)) == 1
    with pytest.raises(MemoryStoreError):
        m.add(a, "")
    with pytest.raises(MemoryStoreError):
        namespace("k1", "")


def test_knowledge_cli_bulk_add_counts_and_quarantines(tmp_path, capsys):
    from cluster.commands.knowledge import run_add

    docs = tmp_path / "docs"
    (docs / "sub").mkdir(parents=True)
    (docs / "a.md").write_text("Alpha document about sorting lists.")
    (docs / "sub" / "b.txt").write_text("Beta document about dictionaries.")
    (docs / "empty.txt").write_text("  ")
    (docs / "bin.txt").write_bytes(b"\x00\x01\x02")
    (docs / "skip.bin").write_bytes(b"ignored suffix")
    store = tmp_path / "store"
    q = tmp_path / "quarantine.jsonl"
    args = argparse.Namespace(
        paths=[str(docs)],
        store=str(store),
        chunk_chars=600,
        chunk_overlap=80,
        max_document_chars=1_000_000,
        quarantine=str(q),
    )
    assert run_add(args) == 0
    out = capsys.readouterr().out
    assert "2 added, 0 replaced" in out and "2 skipped" in out
    assert sorted(json.loads(ln)["path"].rsplit("/", 1)[1] for ln in q.read_text().splitlines()) == [
        "bin.txt",
        "empty.txt",
    ]
    run_add(args)
    assert "0 added, 2 replaced" in capsys.readouterr().out
    s = KnowledgeStore(store)
    assert s.count() == 2 and s.search("dictionaries", 1)[0].doc_id == "docs/sub/b.txt"
    with sqlite3.connect(s.path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    with pytest.raises(FileNotFoundError):
        run_add(argparse.Namespace(**{**vars(args), "paths": [str(tmp_path / "missing")]}))

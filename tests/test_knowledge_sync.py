"""`genloop knowledge sync`: a folder changed between passes gives the right counts and store contents; ids stay
distinct per relative path; a running retriever deployment sees each pass on its next query; --watch follows a folder
until Ctrl-C."""

from __future__ import annotations

import argparse
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from serve.knowledge import KnowledgeStore
from serve.knowledge_files import add_paths
from serve.knowledge_sync import FolderSync, watch

ROOT = Path(__file__).resolve().parents[1]


def write(p: Path, text: str | bytes) -> Path:
    p.parent.mkdir(parents=True, exist_ok=True)
    (p.write_bytes if isinstance(text, bytes) else p.write_text)(text)
    return p


def ids(store: KnowledgeStore) -> list[str]:
    return store.ids()


def top(store: KnowledgeStore, query: str) -> str | None:
    hits = store.search(query, 1)
    return hits[0].doc_id if hits else None


def test_sync_follows_add_edit_delete_rename_and_skips_what_is_not_text(tmp_path):
    docs = tmp_path / "docs"
    write(docs / "guide.md", "The walrus operator assigns inside an expression.")
    write(docs / "api" / "json.txt", "json.loads parses a string into Python objects.")
    write(docs / "pkg_a" / "__init__.py", "# alpha package: quokka helpers\n")
    write(docs / "pkg_b" / "__init__.py", "# beta package: narwhal helpers\n")
    write(docs / "old_name.md", "Axolotls regrow their limbs.")
    write(docs / "logo.png", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    write(docs / "empty.txt", "  \n")
    write(docs / "big.txt", "x" * 501)
    write(docs / ".git" / "config", "[core] hidden folders are never looked at")
    store = KnowledgeStore(tmp_path / "store", chunk_chars=200, chunk_overlap=20, max_document_chars=500)
    store.add("by-hand", "A note added over HTTP about pelicans.")  # not the folder's: a sync never removes it
    sync = FolderSync(store, docs)
    r = sync.sync()
    assert (r.added, r.replaced, r.removed, r.unchanged) == (5, 0, 0, 0)
    assert r.skipped_by_reason() == {"binary": 1, "empty": 1, "too_large": 1}
    assert sorted(Path(s["path"]).name for s in r.skipped) == ["big.txt", "empty.txt", "logo.png"]
    assert ids(store) == [
        "by-hand",
        "docs/api/json.txt",
        "docs/guide.md",
        "docs/old_name.md",
        "docs/pkg_a/__init__.py",
        "docs/pkg_b/__init__.py",
    ]  # two __init__.py, two ids
    assert top(store, "quokka") == "docs/pkg_a/__init__.py" and top(store, "narwhal") == "docs/pkg_b/__init__.py"
    assert store.get("docs/guide.md")["title"] == "guide.md"

    # between two syncs: one new file, one edit, one deletion, one rename, one more binary file, one fixed file
    write(docs / "new.md", "Pangolins are covered in scales.")
    write(docs / "guide.md", "The match statement does structural pattern matching.")
    (docs / "api" / "json.txt").unlink()
    (docs / "old_name.md").rename(docs / "renamed.md")
    write(docs / "archive.zip", bytes(range(256)))
    write(docs / "empty.txt", "Now it holds text about capybaras.")
    r = sync.sync()
    assert (r.added, r.replaced, r.removed, r.unchanged) == (3, 1, 2, 2)  # added: new, renamed, empty.txt
    assert r.skipped_by_reason() == {"binary": 2, "too_large": 1} and r.batches == 1  # one transaction
    assert ids(store) == [
        "by-hand",
        "docs/empty.txt",
        "docs/guide.md",
        "docs/new.md",
        "docs/pkg_a/__init__.py",
        "docs/pkg_b/__init__.py",
        "docs/renamed.md",
    ]
    assert top(store, "walrus operator") is None and top(store, "match statement") == "docs/guide.md"
    assert top(store, "json loads") is None and top(store, "pangolins") == "docs/new.md"
    assert top(store, "axolotls") == "docs/renamed.md" and top(store, "pelicans") == "by-hand"

    # nothing changed: nothing written; a file that turns binary loses its document, an unreadable one keeps it
    r = sync.sync()
    assert (r.added, r.replaced, r.removed, r.unchanged, r.batches) == (0, 0, 0, 6, 0)
    write(docs / "new.md", b"\x00\x00binary now")
    (docs / "guide.md").unlink()
    (docs / "guide.md").symlink_to(docs / "missing-target.md")  # a dangling link: cannot be read
    r = sync.sync()
    assert (r.added, r.replaced, r.removed, r.unchanged) == (0, 0, 1, 4)
    assert r.skipped_by_reason() == {"binary": 3, "too_large": 1, "unreadable": 1}
    assert top(store, "pangolins") is None and top(store, "match statement") == "docs/guide.md"
    # a fresh syncer (another process: nothing remembered) agrees that nothing changed
    r = FolderSync(store, docs).sync()
    assert (r.added, r.replaced, r.removed, r.unchanged) == (0, 0, 0, 4)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        FolderSync(store, tmp_path / "nope")
    with pytest.raises(ValueError, match="not a folder"):
        FolderSync(store, docs / "renamed.md")


def test_knowledge_add_ids_are_distinct_per_relative_path_and_sync_takes_over(tmp_path):
    """The bug: `knowledge add json/ http/` gave both __init__.py files the id "__init__.py" (the second replaced the
    first). Ids now carry the folder; a file given alone keeps the id it has when its folder is given."""
    a, b = tmp_path / "src" / "json", tmp_path / "src" / "http"
    write(a / "__init__.py", "json package: dumps and loads")
    write(a / "decoder.py", "JSONDecoder decodes a document")
    write(b / "__init__.py", "http package: status codes")
    store = KnowledgeStore(tmp_path / "kb")
    counts = add_paths(store, [str(a), str(b), str(a / "decoder.py")])
    assert counts == {"added": 3, "replaced": 0, "chunks": 3, "skipped": 0}  # decoder.py given twice: once
    assert ids(store) == ["http/__init__.py", "json/__init__.py", "json/decoder.py"]
    assert add_paths(store, [str(a / "__init__.py")])["replaced"] == 1
    # a sync of the folder loaded by hand takes its documents over unchanged (no rewrite), then follows it
    r = FolderSync(store, a).sync()
    assert (r.added, r.replaced, r.removed, r.unchanged) == (0, 0, 0, 2) and r.batches == 1
    assert store.get("json/decoder.py")["source"] == str(a.resolve())
    (a / "decoder.py").unlink()
    assert FolderSync(store, a).sync().removed == 1
    assert ids(store) == ["http/__init__.py", "json/__init__.py"]


def test_two_folders_of_one_name_conflict_until_given_a_prefix_and_never_remove_each_other(tmp_path):
    one, two = tmp_path / "one" / "notes", tmp_path / "two" / "notes"
    write(one / "a.md", "first folder's note about herons")
    write(two / "a.md", "second folder's note about egrets")
    write(two / "b.md", "second folder's note about ibises")
    store = KnowledgeStore(tmp_path / "kb")
    assert FolderSync(store, one).sync().added == 1
    r = FolderSync(store, two).sync()
    assert r.added == 1 and r.skipped_by_reason() == {"id_conflict": 1} and "--prefix" in r.skipped[0]["message"]
    assert top(store, "herons") == "notes/a.md" and top(store, "egrets") is None
    FolderSync(store, two).sync()  # its b.md stays its own; nothing of folder one is touched
    r = FolderSync(store, two, prefix="notes-2").sync()
    assert (r.added, r.removed, r.skipped) == (2, 1, [])  # under the new prefix; notes/b.md (its own) removed
    assert ids(store) == ["notes-2/a.md", "notes-2/b.md", "notes/a.md"]
    assert top(store, "herons") == "notes/a.md" and top(store, "egrets") == "notes-2/a.md"


def test_batches_are_transactions_and_an_older_store_is_migrated(tmp_path):
    docs = tmp_path / "d"
    for i in range(7):
        write(docs / f"f{i}.txt", f"file number {i} about topic{i}")
    # a store written before sync existed: documents without content_hash and source
    db_path = tmp_path / "old" / "knowledge.db"
    db_path.parent.mkdir()
    with sqlite3.connect(db_path) as db:
        db.execute(
            "CREATE TABLE documents (id TEXT PRIMARY KEY, title TEXT NOT NULL, n_chars INTEGER, "
            "n_chunks INTEGER, added_at REAL)"
        )
        db.execute(
            "CREATE VIRTUAL TABLE chunks USING fts5(doc_id UNINDEXED, seq UNINDEXED, title, body, tokenize='unicode61')"
        )
        db.execute("INSERT INTO documents VALUES ('d/f0.txt', 'f0.txt', 20, 1, 0)")
        db.execute("INSERT INTO chunks VALUES ('d/f0.txt', 0, 'f0.txt', 'stale text about kiwis')")
    store = KnowledgeStore(db_path)
    assert store.get("d/f0.txt")["hash"] is None and top(store, "kiwis") == "d/f0.txt"
    r = FolderSync(store, docs, batch_files=3).sync()
    assert (r.added, r.replaced, r.batches) == (6, 1, 3) and store.count() == 7  # 3 + 3 + 1 files
    assert top(store, "kiwis") is None and top(store, "topic0") == "d/f0.txt"
    for i in range(7):
        (docs / f"f{i}.txt").unlink()
    r = FolderSync(store, docs, batch_files=3).sync()
    assert (r.removed, r.batches) == (7, 3) and store.count() == 0


def test_a_path_too_long_for_an_id_is_skipped_not_fatal(tmp_path):
    docs = tmp_path / "d"
    deep = docs.joinpath(*(["n" * 100] * 6))  # a relative path of over 600 characters: over the 512 of an id
    write(deep / "deep.md", "a deep note about lemurs")
    write(docs / "ok.md", "a shallow note about otters")
    store = KnowledgeStore(tmp_path / "kb")
    r = FolderSync(store, docs).sync()
    assert r.added == 1 and r.skipped_by_reason() == {"invalid": 1} and "512" in r.skipped[0]["message"]
    assert ids(store) == ["d/ok.md"]


def test_watch_in_a_thread_picks_up_a_change_and_stops(tmp_path):
    docs = tmp_path / "docs"
    write(docs / "a.md", "armadillo facts")
    store = KnowledgeStore(tmp_path / "kb")
    stop = threading.Event()
    seen: list[tuple[int, int]] = []
    result: list = []
    t = threading.Thread(
        target=lambda: result.append(watch(FolderSync(store, docs), 0.05, stop, lambda n, r: seen.append((n, r.added))))
    )
    t.start()
    deadline = time.time() + 30
    while not seen and time.time() < deadline:
        time.sleep(0.02)
    write(docs / "b.md", "bison facts")
    while top(store, "bison") is None and time.time() < deadline:
        time.sleep(0.02)
    stop.set()
    t.join(10)
    assert not t.is_alive() and top(store, "bison") == "docs/b.md"
    passes, totals, last = result[0]
    assert passes >= 2 and totals.added == 2 and last.unchanged + last.added == 2
    with pytest.raises(ValueError, match="interval"):
        watch(FolderSync(store, docs), 0)


def test_cli_sync_and_watch_until_ctrl_c(tmp_path, capsys):
    from cluster.commands.knowledge import run_sync

    docs = tmp_path / "docs"
    write(docs / "a.md", "okapi facts")
    write(docs / "b.bin", b"\x00\x01")
    store = tmp_path / "kb"
    q = tmp_path / "skipped.jsonl"
    args = argparse.Namespace(
        action="sync",
        folder=str(docs),
        store=str(store),
        chunk_chars=600,
        chunk_overlap=80,
        max_document_chars=1_000_000,
        quarantine=str(q),
        prefix=None,
        suffixes=None,
        batch_files=64,
        watch=False,
        interval=1.0,
    )
    assert run_sync(args) == 0
    out = capsys.readouterr().out
    assert "1 added, 0 replaced, 0 removed, 0 unchanged, 1 skipped (1 binary)" in out and "b.bin: binary" in out
    assert '"reason": "binary"' in q.read_text()
    assert run_sync(argparse.Namespace(**{**vars(args), "suffixes": ".txt"})) == 0  # a.md is no longer wanted
    assert "0 added, 0 replaced, 1 removed" in capsys.readouterr().out

    # --watch as a user runs it: a separate process, a change while it runs, then Ctrl-C (SIGINT)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [
        sys.executable,
        "-m",
        "cluster.cli",
        "knowledge",
        "sync",
        str(docs),
        "--store",
        str(store),
        "--watch",
        "--interval",
        "0.2",
    ]
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        reader = KnowledgeStore(store)
        deadline = time.time() + 120
        while top(reader, "okapi") is None and time.time() < deadline:  # the first pass ran
            time.sleep(0.1)
        write(docs / "c.md", "tapir facts")
        while top(reader, "tapir") is None and time.time() < deadline:
            time.sleep(0.1)
        assert top(reader, "tapir") == "docs/c.md"
        p.send_signal(signal.SIGINT)
        out, _ = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 0, out
    assert "watching every 0.2 s" in out and "Traceback" not in out
    assert "2 added, 0 replaced, 0 removed in all; now 2 files synced, 1 skipped" in out


@pytest.mark.slow
def test_running_retriever_sees_each_sync_on_its_next_query(ray_session, tmp_path):
    """The unit the server's ingress queries for RAG: the Retriever deployment (its own replica process, holding
    its own connection to the store). A sync from this process shows on the replica's next query."""
    from ray import serve

    from serve.retriever import RetrieverServer
    from tests.helpers import free_port

    docs = tmp_path / "docs"
    write(docs / "zebra.md", "Quagga zebras are striped equines from Africa.")
    write(docs / "old.md", "Dodos were flightless birds of Mauritius.")
    state = tmp_path / "state"
    store = KnowledgeStore(state)
    sync = FolderSync(store, docs)
    assert sync.sync().added == 2
    serve.start(http_options={"host": "127.0.0.1", "port": free_port()})
    handle = serve.run(
        RetrieverServer.options(ray_actor_options={"num_cpus": 0.1}).bind(str(state), str(state / "memory.db")),
        name="ksync-test",
        route_prefix=None,
    )

    def found(query: str) -> list[tuple[str, str]]:
        ctx = handle.context.remote(query, None, 3, 0).result(timeout_s=60)
        return [(p["doc_id"], p["text"]) for p in ctx["passages"]]

    try:
        assert found("flightless dodos")[0][0] == "docs/old.md"
        write(docs / "new.md", "Tapirs have a short prehensile snout.")
        write(docs / "zebra.md", "Plains zebras live in large herds on the savanna.")
        (docs / "old.md").unlink()
        r = sync.sync()
        assert (r.added, r.replaced, r.removed) == (1, 1, 1)
        assert found("prehensile snout tapirs")[0][0] == "docs/new.md"  # new content
        assert found("flightless dodos") == []  # deleted content is gone
        assert found("zebras") == [("docs/zebra.md", "Plains zebras live in large herds on the savanna.")]
    finally:  # Serve down, not just the app: a later module's serve.start sets its own HTTP port
        serve.shutdown()


def test_sync_follows_a_folder_on_object_storage(tmp_path, monkeypatch):
    """The same passes over an s3:// folder (moto's S3 on loopback; the endpoint set for this test only)."""
    pytest.importorskip("moto.server", reason="moto[server] (test extra) runs the local S3")
    import boto3
    from moto.server import ThreadedMotoServer

    from pipelines.artifacts import write_bytes
    from tests.helpers import free_port

    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    for k, v in {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }.items():
        monkeypatch.setenv(k, v)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    try:
        s3 = boto3.client("s3", endpoint_url=endpoint)
        s3.create_bucket(Bucket="genloop-kb")
        write_bytes("s3://genloop-kb/wiki/a.md", b"ocelots are small wild cats")
        write_bytes("s3://genloop-kb/wiki/sub/b.md", b"lynxes have tufted ears")
        write_bytes("s3://genloop-kb/wiki/c.bin", b"\x00\xff")
        store = KnowledgeStore(tmp_path / "kb")
        sync = FolderSync(store, "s3://genloop-kb/wiki")
        r = sync.sync()
        assert (r.added, r.skipped_by_reason()) == (2, {"binary": 1})
        assert ids(store) == ["wiki/a.md", "wiki/sub/b.md"] and top(store, "lynxes") == "wiki/sub/b.md"
        write_bytes("s3://genloop-kb/wiki/a.md", b"servals have long legs")
        s3.delete_object(Bucket="genloop-kb", Key="wiki/sub/b.md")
        r = sync.sync()
        assert (r.added, r.replaced, r.removed, r.unchanged) == (0, 1, 1, 0)
        assert ids(store) == ["wiki/a.md"] and top(store, "servals") == "wiki/a.md" and top(store, "ocelots") is None
        assert sync.sync().unchanged == 1
    finally:
        server.stop()

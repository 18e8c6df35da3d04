"""The knowledge store RAG reads: documents chunked into passages, ranked by BM25 (SQLite FTS5), durable on disk.

One SQLite file (WAL mode, so the retriever replica and ``genloop knowledge add`` / ``sync`` may use it at once).
``add`` replaces a document with the same id in one transaction, so a crash never leaves half a document; ``apply``
writes and removes a whole batch in one transaction (what ``knowledge sync``, in ``serve.knowledge_sync``, uses).
Searches read the tables afresh on every call, so a reader in another process sees a write once it commits. Each
document records its content hash and the synced folder that owns it (``source``; NULL when added by hand).
Another ranking (e.g. vectors) can be put behind the same methods: ``add(doc_id, text, title)``, ``apply(puts,
removes)``, ``delete(doc_id)``, ``search(query, k) -> [Passage]``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from pipelines.artifacts import is_uri, list_files, name, parent, read_bytes, write_text
from serve.sqlite import add_columns, open_db

log = logging.getLogger(__name__)

DB_NAME = "knowledge.db"
# what `genloop knowledge add DIR` picks up from a folder
TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py", ".json", ".yaml", ".yml", ".html", ".csv")

_WORD = re.compile(r"\w+", re.UNICODE)


class KnowledgeError(ValueError):
    """Bad input to the store (empty or oversized document, bad id); the message says what to do."""


@dataclass
class Passage:
    doc_id: str
    title: str
    chunk: int  # index of the chunk within its document
    text: str
    score: float  # BM25 relevance, higher is better


def store_path(path: str | Path) -> Path:
    """``--knowledge DIR_OR_DB``: a ``.db``/``.sqlite`` file, or a folder that holds ``knowledge.db``."""
    p = Path(path)
    if p.suffix in (".db", ".sqlite", ".sqlite3") or (p.exists() and p.is_file()):
        return p
    return p / DB_NAME


def chunk_text(text: str, size: int = 600, overlap: int = 80) -> list[str]:
    """Split ``text`` into chunks of at most ``size`` characters, cut at paragraph, line or word boundaries where
    possible; consecutive chunks share up to ``overlap`` characters so a sentence cut in two is still findable."""
    if size <= 0 or overlap < 0 or overlap >= size:
        raise KnowledgeError(f"chunking needs size > overlap >= 0, got size={size} overlap={overlap}")
    text = text.strip()
    chunks: list[str] = []
    start = 0
    while start < len(text):
        end = min(len(text), start + size)
        if end < len(text):
            window = text[start:end]
            # prefer the last paragraph break, then line break, then space in the second half of the window
            for sep in ("\n\n", "\n", " "):
                cut = window.rfind(sep)
                if cut > size // 2:
                    end = start + cut + len(sep)
                    break
        piece = text[start:end].strip()
        if piece:
            chunks.append(piece)
        if end >= len(text):
            break
        nxt = end - overlap
        if overlap:  # start the overlap at a word boundary
            sp = text.find(" ", nxt, end)
            nxt = sp + 1 if sp != -1 else nxt
        start = max(nxt, start + 1)
    return chunks


def fts_query(text: str, max_terms: int = 32) -> str:
    """A free-text question -> an FTS5 query matching any of its words (each quoted: no FTS syntax injection)."""
    seen: list[str] = []
    for w in _WORD.findall(text.lower()):
        if w not in seen:
            seen.append(w)
        if len(seen) >= max_terms:
            break
    return " OR ".join(f'"{w}"' for w in seen)


def doc_id_for(text: str) -> str:
    return "doc-" + hashlib.sha256(text.encode()).hexdigest()[:16]


def content_hash(text: str) -> str:
    """What a sync compares to tell a changed file from an unchanged one (sha256 of the UTF-8 text)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass
class Doc:
    """One document to write: ``source`` names the synced folder that owns it (None: added by hand or over HTTP)."""

    id: str
    text: str
    title: str
    source: str | None = None


class KnowledgeStore:
    """Documents -> chunks in an FTS5 table; thread-safe within a process, WAL for several processes.

    Every read is its own SQLite read transaction, so a reader (the retriever replica) sees what another process
    (``genloop knowledge sync``) committed on its next query; nothing is cached in memory."""

    def __init__(self, path: str | Path, chunk_chars: int = 600, chunk_overlap: int = 80,
                 max_document_chars: int = 1_000_000) -> None:
        self.path = store_path(path)
        self.chunk_chars, self.chunk_overlap, self.max_document_chars = chunk_chars, chunk_overlap, max_document_chars
        self._lock = threading.Lock()
        self._db = open_db(
            self.path,
            "PRAGMA synchronous=NORMAL",
            "CREATE TABLE IF NOT EXISTS documents (id TEXT PRIMARY KEY, title TEXT NOT NULL, n_chars INTEGER, "
            "n_chunks INTEGER, added_at REAL, content_hash TEXT, source TEXT)",
            "CREATE VIRTUAL TABLE IF NOT EXISTS chunks USING fts5(doc_id UNINDEXED, seq UNINDEXED, title, body, "
            "tokenize='unicode61')")
        # stores written before `knowledge sync` existed: documents without hash and owner (a sync re-reads them)
        add_columns(self._db, "documents", {"content_hash": "TEXT", "source": "TEXT"})
        with self._db:
            self._db.execute("CREATE INDEX IF NOT EXISTS documents_source ON documents (source)")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def check(self, doc_id: str | None, text: str, title: str | None = None, source: str | None = None) -> Doc:
        """A valid ``Doc`` (id from the text when None, title defaulting to the id) or a KnowledgeError."""
        if not isinstance(text, str) or not text.strip():
            raise KnowledgeError("document text is empty; send non-empty 'text'")
        if len(text) > self.max_document_chars:
            raise KnowledgeError(f"document has {len(text)} characters, over the limit of {self.max_document_chars}; "
                                 "split it into several documents")
        doc_id = doc_id or doc_id_for(text)
        if not isinstance(doc_id, str) or len(doc_id) > 512 or not doc_id.strip():
            raise KnowledgeError("document id must be a non-empty string of at most 512 characters")
        return Doc(doc_id, text, (title or doc_id)[:512], source)

    def add(self, doc_id: str | None, text: str, title: str | None = None) -> dict:
        """Add or replace a document; returns ``{"id", "title", "chunks", "replaced"}``."""
        doc = self.check(doc_id, text, title)
        r = self.apply([doc])
        return {"id": doc.id, "title": doc.title, "chunks": r["chunks"], "replaced": bool(r["replaced"])}

    def add_many(self, docs: Iterable[tuple[str | None, str, str | None]]) -> list[dict]:
        return [self.add(i, t, ti) for i, t, ti in docs]

    def apply(self, puts: list[Doc], removes: Iterable[str] = (), claim: dict[str, str | None] | None = None) -> dict:
        """Write ``puts`` (each replacing a document of the same id), delete the ids in ``removes`` and set the owner
        of the documents in ``claim`` (``{id: source}``), all in ONE transaction: a reader sees the whole batch or
        none of it. Returns ``{"added", "replaced", "removed", "chunks"}``. Chunking happens before the write lock
        is taken."""
        chunked = [(d, chunk_text(d.text, self.chunk_chars, self.chunk_overlap)) for d in puts]
        out = {"added": 0, "replaced": 0, "removed": 0, "chunks": 0}
        now = time.time()
        with self._lock, self._db:
            for doc_id in removes:
                out["removed"] += self._delete(doc_id)
            for d, chunks in chunked:
                out["replaced" if self._delete(d.id) else "added"] += 1
                self._db.executemany("INSERT INTO chunks (doc_id, seq, title, body) VALUES (?, ?, ?, ?)",
                                     [(d.id, i, d.title, c) for i, c in enumerate(chunks)])
                self._db.execute("INSERT INTO documents (id, title, n_chars, n_chunks, added_at, content_hash, source) "
                                 "VALUES (?, ?, ?, ?, ?, ?, ?)",
                                 (d.id, d.title, len(d.text), len(chunks), now, content_hash(d.text), d.source))
                out["chunks"] += len(chunks)
            self._db.executemany("UPDATE documents SET source = ? WHERE id = ?",
                                 [(src, i) for i, src in (claim or {}).items()])
        return out

    def _delete(self, doc_id: str) -> bool:
        """Within the caller's transaction and lock."""
        found = self._db.execute("DELETE FROM documents WHERE id = ?", (doc_id,)).rowcount > 0
        self._db.execute("DELETE FROM chunks WHERE doc_id = ?", (doc_id,))
        return found

    def delete(self, doc_id: str) -> bool:
        with self._lock, self._db:
            return self._delete(doc_id)

    def get(self, doc_id: str) -> dict | None:
        with self._lock:
            row = self._db.execute("SELECT id, title, n_chars, n_chunks, added_at, content_hash, source FROM documents "
                                   "WHERE id = ?", (doc_id,)).fetchone()
        return None if row is None else dict(zip(("id", "title", "chars", "chunks", "added_at", "hash", "source"),
                                                 row))

    def ids(self, prefix: str = "") -> list[str]:
        """Every document id starting with ``prefix``, sorted."""
        with self._lock:
            rows = self._db.execute("SELECT id FROM documents WHERE substr(id, 1, ?) = ? ORDER BY id",
                                    (len(prefix), prefix)).fetchall()
        return [r[0] for r in rows]

    def owned(self, source: str, prefix: str) -> dict[str, tuple[str | None, str | None]]:
        """``{id: (source, content_hash)}`` of the documents a sync of ``source`` must look at: those it owns, and
        any whose id starts with ``prefix`` (its files' ids)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT id, source, content_hash FROM documents WHERE source = ? OR substr(id, 1, ?) = ?",
                (source, len(prefix), prefix)).fetchall()
        return {i: (s, h) for i, s, h in rows}

    def count(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM documents").fetchone()[0])

    def search(self, query: str, k: int = 3) -> list[Passage]:
        """The ``k`` best chunks for ``query`` by BM25 (title weighted 2x the body), best first."""
        q = fts_query(query)
        if not q or k <= 0:
            return []
        with self._lock:
            # bm25() is "lower is better" (negative); weights follow the column order doc_id, seq, title, body
            rows = self._db.execute(
                "SELECT doc_id, seq, title, body, bm25(chunks, 0.0, 0.0, 2.0, 1.0) AS r FROM chunks "
                "WHERE chunks MATCH ? ORDER BY r LIMIT ?", (q, k)).fetchall()
        return [Passage(doc_id=d, title=t, chunk=int(s), text=b, score=-float(r)) for d, s, t, b, r in rows]


class Unusable(KnowledgeError):
    """A file that cannot be a document; ``reason`` is one of ``SKIP_REASONS`` (what the counts are keyed by)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


SKIP_REASONS = ("binary", "too_large", "empty", "unreadable", "id_conflict", "invalid")


def read_document(uri: str, max_chars: int, size: int | None = None) -> str:
    """A file's UTF-8 text, or ``Unusable`` saying why not: binary (NUL bytes or not UTF-8), too large (over
    ``max_chars`` characters; a file of more than 4 bytes per allowed character is refused unread), empty, or
    unreadable (permissions, vanished, I/O error)."""
    if size is not None and size > 4 * max_chars:
        raise Unusable("too_large", f"{size} bytes, over the limit of {max_chars} characters")
    try:
        data = read_bytes(uri)
    except OSError as e:  # PermissionError, FileNotFoundError (deleted while we looked), IsADirectoryError, EIO
        raise Unusable("unreadable", f"cannot read it ({e.__class__.__name__}: {e})") from None
    if b"\x00" in data:
        raise Unusable("binary", "NUL bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise Unusable("binary", f"not UTF-8 text at byte {e.start}") from None
    if not text.strip():
        raise Unusable("empty", "no text in it")
    if len(text) > max_chars:
        raise Unusable("too_large", f"{len(text)} characters, over the limit of {max_chars}")
    return text


def _label(path: str | Path) -> str:
    """The folder name a document id starts with (``/`` and bucket roots have none)."""
    return name(path) if is_uri(path) else Path(path).resolve().name


def document_id(root_label: str, rel: str) -> str:
    """``<folder name>/<path relative to it>``: stable, and distinct for files of the same name in different
    folders (``json/__init__.py`` vs ``http/__init__.py``)."""
    return f"{root_label}/{rel}" if root_label else rel


def iter_files(paths: Iterable[str | Path], suffixes: tuple[str, ...] = TEXT_SUFFIXES) -> Iterable[tuple[Path, Path]]:
    """(file, root it was found under) for every text file under ``paths`` (files are taken as given)."""
    for p in map(Path, paths):
        if not p.exists():
            raise FileNotFoundError(f"{p} does not exist; pass files or folders of text documents")
        if p.is_file():
            yield p, p.parent
        else:
            for f in sorted(p.rglob("*")):
                if f.is_file() and f.suffix.lower() in suffixes and not any(part.startswith(".") for part in
                                                                            f.relative_to(p).parts):
                    yield f, p


def source_files(paths: Iterable[str]) -> Iterable[tuple[str, str]]:
    """(file path or URI, document id) for every text file under ``paths``: local files/folders (``iter_files``) or
    ``s3://`` / ``gs://`` URIs. The id is ``document_id``: the folder given's name, then the path below it
    (``docs/sub/a.md``); a file given alone is named with its folder (``sub/a.md``), so a file reached both ways
    keeps one id. A file listed twice is yielded once."""
    seen: set[str] = set()
    for p in paths:
        p = str(p)
        if not is_uri(p):
            for f, root in iter_files([p]):
                key = str(f.resolve())
                if key not in seen:
                    seen.add(key)
                    yield str(f), document_id(_label(root), f.relative_to(root).as_posix())
            continue
        files = list_files(p)
        if not files:
            raise FileNotFoundError(f"{p} does not exist; pass files or folders of text documents")
        if files == [p]:
            if p not in seen:
                seen.add(p)
                yield p, document_id(name(parent(p) or ""), name(p))
            continue
        base = p.rstrip("/") + "/"
        for f in files:
            rel = f[len(base):]
            if rel.lower().endswith(TEXT_SUFFIXES) and not any(part.startswith(".") for part in rel.split("/")) \
                    and f not in seen:
                seen.add(f)
                yield f, document_id(_label(p), rel)


def add_paths(store: KnowledgeStore, paths: list[str], quarantine: str | None = None) -> dict:
    """Load every text file under ``paths`` (local or URIs) into ``store``: one document per file, id =
    ``document_id`` (folder name + relative path), title = its name; re-adding replaces. Empty, binary, oversized or
    unreadable files are skipped, counted and listed in ``quarantine`` (JSONL) when given. Returns ``{"added",
    "replaced", "chunks", "skipped"}``."""
    counts = {"added": 0, "replaced": 0, "chunks": 0, "skipped": 0}
    skipped: list[dict] = []
    for f, doc_id in source_files(paths):
        try:
            text = read_document(f, store.max_document_chars)
            r = store.add(doc_id, text, title=name(f))
        except KnowledgeError as e:
            counts["skipped"] += 1
            skipped.append({"path": f, "reason": getattr(e, "reason", "invalid"), "message": str(e).split(";")[0]})
            log.warning("skipped %s: %s", f, e)
            continue
        counts["replaced" if r["replaced"] else "added"] += 1
        counts["chunks"] += r["chunks"]
    if quarantine and skipped:
        write_text(quarantine, "".join(json.dumps(s) + "\n" for s in skipped))
    return counts

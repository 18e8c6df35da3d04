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
import logging
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from serve.errors import ServeError
from serve.sqlite import add_columns, open_db
from serve.terms import match_query, terms_text
from serve.vectors import Embedder, VectorError, VectorIndex

log = logging.getLogger(__name__)

DB_NAME = "knowledge.db"
# what `genloop knowledge add DIR` picks up from a folder
TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py", ".json", ".yaml", ".yml", ".html", ".csv")

_WORD = re.compile(r"\w+", re.UNICODE)

# BM25 weights of the chunk's document title, its path (the document id) and the chunk's body
LEXICAL_WEIGHTS = (2.0, 2.0, 1.0)
SEARCH_MODES = ("lexical", "dense", "hybrid")
RRF_K = 60.0
EMBED_BATCH = 256  # chunks embedded per call while the vector index catches up
SAVE_EVERY_S = 30.0  # the index file is rewritten at most this often (and after 1000+ new vectors, and at close)
# the raw title/body are stored for display (UNINDEXED); their code-aware terms (serve.terms) are what BM25 ranks.
# `tokenchars '._'` keeps a whole identifier (json.loads, snake_case) one token. No stemming: porter cost 6 points
# of recall@5 on half of the stdlib question set (0.846 vs 0.914 with plain terms, 0.857 vs 0.903 code-aware)
CHUNKS_SCHEMA = (
    "CREATE VIRTUAL TABLE chunks USING fts5(doc_id UNINDEXED, seq UNINDEXED, title UNINDEXED, "
    "body UNINDEXED, t_title, t_path, t_body, tokenize = \"unicode61 tokenchars '._'\")"
)
INSERT_CHUNK = (
    "INSERT INTO chunks (rowid, doc_id, seq, title, body, t_title, t_path, t_body) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)
BUMP_GENERATION = "UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'generation'"


def _chunk_row(doc_id: str, seq: int, title: str, body: str) -> list:
    """A chunks row without its id (``apply`` puts it first): raw fields, then their terms."""
    return [doc_id, seq, title, body, terms_text(title), terms_text(doc_id.replace("/", " ")), terms_text(body)]


def embed_text(doc_id: str, title: str, body: str) -> str:
    """What the embedder reads for a chunk: where it comes from (id, title), then its text."""
    head = doc_id if title in doc_id else f"{doc_id} {title}"
    return f"{head}\n{body}"


def rrf(ranked: list[list], k: float = RRF_K) -> list[tuple[object, float]]:
    """Reciprocal rank fusion (Cormack et al. 2009): ``score(d) = sum over lists of 1 / (k + rank)`` with 1-based
    ranks (the best item of a list adds ``1 / (k + 1)``; llama_index's fusion retriever counts from 0, which only
    shifts every term by one). An item missing from a list adds nothing there; an item repeated within a list
    counts at its best rank. Ties: the better single rank first, then first seen. Returns ``(item, score)``
    best first."""
    score: dict = {}
    best: dict = {}
    for lst in ranked:
        seen: set = set()
        for rank, item in enumerate(lst, start=1):
            if item in seen:
                continue
            seen.add(item)
            score[item] = score.get(item, 0.0) + 1.0 / (k + rank)
            best[item] = min(best.get(item, rank), rank)
    order = {item: n for n, item in enumerate(score)}
    return sorted(score.items(), key=lambda kv: (-kv[1], best[kv[0]], order[kv[0]]))


class KnowledgeError(ServeError):
    """Bad input to the store (empty or oversized document, bad id); the message says what to do."""


@dataclass
class Passage:
    doc_id: str
    title: str
    chunk: int  # index of the chunk within its document
    text: str
    score: float  # higher is better: BM25 relevance (lexical), cosine (dense) or fused RRF score (hybrid)


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
    """Documents -> chunks in an FTS5 table (+ a vector index beside it when an embedder is given); thread-safe
    within a process, WAL for several processes.

    Every lexical read is its own SQLite read transaction, so a reader (the retriever replica) sees what another
    process (``genloop knowledge sync``) committed on its next query. The vector index is held in memory and caught
    up with the store before every dense search: each write bumps ``meta.generation`` in its transaction; a search
    that sees a new generation removes the vectors of chunks no longer in SQLite and embeds the new ones (chunk ids
    are never reused, so a vector can only be missing or extra, never stale). A writer without an embedder (the
    CLI) therefore needs nothing: the server embeds what it wrote on its next query.

    Lexical ranking: BM25 over code-aware terms (``serve.terms``) in three weighted columns, the chunk's body, its
    document's title and its document's path (the id). Hybrid ranking (``search`` with an embedder): the ``candidates``
    best chunks of each side fused by reciprocal rank fusion (``rrf``, 1-based ranks, ``rrf_k`` = 60)."""

    def __init__(
        self,
        path: str | Path,
        chunk_chars: int = 600,
        chunk_overlap: int = 80,
        max_document_chars: int = 1_000_000,
        embedder: "Embedder | None" = None,
        rrf_k: float = 60.0,
        candidates: int = 50,
        reindex: bool = False,
        weights: tuple[float, float, float] = LEXICAL_WEIGHTS,
    ) -> None:
        self.path = store_path(path)
        self.chunk_chars, self.chunk_overlap, self.max_document_chars = chunk_chars, chunk_overlap, max_document_chars
        self.embedder, self.rrf_k, self.candidates, self.weights = embedder, rrf_k, candidates, tuple(weights)
        if rrf_k < 0 or candidates < 1 or len(self.weights) != 3:
            raise KnowledgeError(
                f"need rrf_k >= 0, candidates >= 1 and 3 lexical weights; got {rrf_k}, {candidates}, {self.weights}"
            )
        self._lock = threading.Lock()
        self._db = open_db(
            self.path,
            "PRAGMA synchronous=NORMAL",
            "CREATE TABLE IF NOT EXISTS documents (id TEXT PRIMARY KEY, title TEXT NOT NULL, n_chars INTEGER, "
            "n_chunks INTEGER, added_at REAL, content_hash TEXT, source TEXT)",
            "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)",
            "INSERT OR IGNORE INTO meta (key, value) VALUES ('generation', '0')",
        )
        # stores written before `knowledge sync` existed: documents without hash and owner (a sync re-reads them)
        add_columns(self._db, "documents", {"content_hash": "TEXT", "source": "TEXT"})
        with self._db:
            self._db.execute("CREATE INDEX IF NOT EXISTS documents_source ON documents (source)")
        self._chunks_table()
        # the vector side: loaded (or built from the chunks) on the first dense search
        self._vlock = threading.Lock()
        self._index: VectorIndex | None = None
        self._vgen: str | None = None  # the store generation the index was caught up with
        self._saved_at, self._dirty = 0.0, False
        if embedder is not None:
            self._claim_embedder(reindex)

    # ---- schema --------------------------------------------------------------------------------------------------

    def _chunks_table(self) -> None:
        """Create the chunks table, or move a store written with another chunks schema (before code-aware terms: one
        ``unicode61`` table of title and body) to this one in one transaction: every chunk is re-indexed under its
        own id (so a saved vector index stays valid), none is lost."""
        row = self._db.execute("SELECT sql FROM sqlite_master WHERE name = 'chunks'").fetchone()
        if row is not None and row[0] == CHUNKS_SCHEMA and self._meta("next_chunk") is not None:
            return
        self._db.execute("BEGIN IMMEDIATE")
        try:
            row = self._db.execute("SELECT sql FROM sqlite_master WHERE name = 'chunks'").fetchone()
            if row is None or row[0] != CHUNKS_SCHEMA:
                if row is not None:
                    self._db.execute("ALTER TABLE chunks RENAME TO chunks_old")
                self._db.execute(CHUNKS_SCHEMA)
                if row is not None:
                    old = self._db.execute("SELECT rowid, doc_id, seq, title, body FROM chunks_old").fetchall()
                    self._db.executemany(INSERT_CHUNK, [[i] + _chunk_row(d, int(s), t, b) for i, d, s, t, b in old])
                    self._db.execute("DROP TABLE chunks_old")
                    log.info("knowledge store %s: re-indexed %d chunks with code-aware terms", self.path, len(old))
            self._db.execute(
                "INSERT OR IGNORE INTO meta (key, value) VALUES ('next_chunk', "
                "(SELECT COALESCE(MAX(rowid), 0) + 1 FROM chunks))"
            )
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise

    def _meta(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    def _claim_embedder(self, reindex: bool) -> None:
        """Record the embedder in the store, or refuse one that differs from the recorded one (unless ``reindex``:
        then the vectors are rebuilt with the new one)."""
        e = self.embedder
        if e.max_chars < self.chunk_chars:
            raise VectorError(
                f"chunks of up to {self.chunk_chars} characters are over what embedder {e.identity} "
                f"takes whole ({e.max_chars}); lower chunk_chars to {e.max_chars} or less"
            )
        with self._lock, self._db:
            self._db.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('embedder', ?)", (e.identity,))
            had = self._meta("embedder")
            if had != e.identity:
                if not reindex:
                    raise VectorError(
                        f"knowledge store {self.path} is indexed for embedder {had}, this retriever is configured "
                        f"with {e.identity}: configure {had}, or re-embed the store with the new one (reindex: "
                        "serve.rag_reindex=true, or --reindex)"
                    )
                log.warning(
                    "knowledge store %s: embedder %s replaces %s; its vectors are rebuilt", self.path, e.identity, had
                )
                self._db.execute("UPDATE meta SET value = ? WHERE key = 'embedder'", (e.identity,))

    def close(self) -> None:
        with self._vlock:
            if self._dirty and self._index is not None:
                self._save_index()
        with self._lock:
            self._db.close()

    def check(self, doc_id: str | None, text: str, title: str | None = None, source: str | None = None) -> Doc:
        """A valid ``Doc`` (id from the text when None, title defaulting to the id) or a KnowledgeError."""
        if not isinstance(text, str) or not text.strip():
            raise KnowledgeError("document text is empty; send non-empty 'text'")
        if len(text) > self.max_document_chars:
            raise KnowledgeError(
                f"document has {len(text)} characters, over the limit of {self.max_document_chars}; "
                "split it into several documents"
            )
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
        none of it. Returns ``{"added", "replaced", "removed", "chunks"}``. Chunking and term splitting happen
        before the write lock is taken; with the vector index open in this process, it is caught up right after
        (a document added over HTTP is searchable by vectors on the next request without waiting for it)."""
        chunked = [
            (
                d,
                [
                    _chunk_row(d.id, i, d.title, c)
                    for i, c in enumerate(chunk_text(d.text, self.chunk_chars, self.chunk_overlap))
                ],
            )
            for d in puts
        ]
        out = {"added": 0, "replaced": 0, "removed": 0, "chunks": 0}
        now = time.time()
        with self._lock, self._db:
            # the first write takes SQLite's write lock, so the chunk ids read next are this transaction's own
            self._db.execute(BUMP_GENERATION)
            next_id = int(self._meta("next_chunk"))  # chunk ids only grow: a vector is never reused for other text
            for doc_id in removes:
                out["removed"] += self._delete(doc_id)
            for d, rows in chunked:
                out["replaced" if self._delete(d.id) else "added"] += 1
                self._db.executemany(INSERT_CHUNK, [[next_id + i] + r for i, r in enumerate(rows)])
                next_id += len(rows)
                self._db.execute(
                    "INSERT INTO documents (id, title, n_chars, n_chunks, added_at, content_hash, source) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (d.id, d.title, len(d.text), len(rows), now, content_hash(d.text), d.source),
                )
                out["chunks"] += len(rows)
            self._db.executemany(
                "UPDATE documents SET source = ? WHERE id = ?", [(src, i) for i, src in (claim or {}).items()]
            )
            self._db.execute("UPDATE meta SET value = ? WHERE key = 'next_chunk'", (str(next_id),))
        if self._index is not None:
            self._catch_up()
        return out

    def _delete(self, doc_id: str) -> bool:
        """Within the caller's transaction and lock."""
        found = self._db.execute("DELETE FROM documents WHERE id = ?", (doc_id,)).rowcount > 0
        self._db.execute("DELETE FROM chunks WHERE doc_id = ?", (doc_id,))
        return found

    def delete(self, doc_id: str) -> bool:
        with self._lock, self._db:
            self._db.execute(BUMP_GENERATION)
            found = self._delete(doc_id)
        if self._index is not None:
            self._catch_up()
        return found

    def get(self, doc_id: str) -> dict | None:
        with self._lock:
            row = self._db.execute(
                "SELECT id, title, n_chars, n_chunks, added_at, content_hash, source FROM documents WHERE id = ?",
                (doc_id,),
            ).fetchone()
        return None if row is None else dict(zip(("id", "title", "chars", "chunks", "added_at", "hash", "source"), row))

    def ids(self, prefix: str = "") -> list[str]:
        """Every document id starting with ``prefix``, sorted."""
        with self._lock:
            rows = self._db.execute(
                "SELECT id FROM documents WHERE substr(id, 1, ?) = ? ORDER BY id", (len(prefix), prefix)
            ).fetchall()
        return [r[0] for r in rows]

    def owned(self, source: str, prefix: str) -> dict[str, tuple[str | None, str | None]]:
        """``{id: (source, content_hash)}`` of the documents a sync of ``source`` must look at: those it owns, and
        any whose id starts with ``prefix`` (its files' ids)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT id, source, content_hash FROM documents WHERE source = ? OR substr(id, 1, ?) = ?",
                (source, len(prefix), prefix),
            ).fetchall()
        return {i: (s, h) for i, s, h in rows}

    def chunk_texts(self) -> list[tuple[str, str, str]]:
        """(doc id, title, text) of every chunk, in id order (what an embedder is fitted on)."""
        with self._lock:
            return [tuple(r) for r in self._db.execute("SELECT doc_id, title, body FROM chunks ORDER BY rowid")]

    def count(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM documents").fetchone()[0])

    def search(self, query: str, k: int = 3, mode: str | None = None) -> list[Passage]:
        """The ``k`` best chunks for ``query``, best first. ``mode``: ``lexical`` (BM25; ``score`` the BM25
        relevance), ``dense`` (cosine; ``score`` the cosine) or ``hybrid`` (RRF; ``score`` the fused score); default
        hybrid with an embedder, lexical without."""
        mode = mode or ("hybrid" if self.embedder is not None else "lexical")
        if mode not in SEARCH_MODES:
            raise KnowledgeError(f"search mode {mode!r}: use one of {SEARCH_MODES}")
        if k <= 0:
            return []
        if mode != "lexical" and self.embedder is None:
            raise KnowledgeError(f"search mode {mode!r} needs an embedder; none is configured")
        if mode == "lexical":
            ranked = self._lexical(query, k)
        elif mode == "dense":
            ranked = self._dense(query, k)
        else:
            n = max(k, self.candidates)
            ranked = rrf([[i for i, _ in self._lexical(query, n)], [i for i, _ in self._dense(query, n)]], self.rrf_k)[
                :k
            ]
        rows = self._rows([i for i, _ in ranked])
        # a chunk deleted since its id was ranked is not in `rows`: it is dropped, never returned
        return [
            Passage(doc_id=rows[i][0], title=rows[i][2], chunk=int(rows[i][1]), text=rows[i][3], score=s)
            for i, s in ranked
            if i in rows
        ]

    def _lexical(self, query: str, n: int) -> list[tuple[int, float]]:
        """(chunk id, BM25 relevance) of the ``n`` best chunks."""
        q = match_query(query)
        if not q:
            return []
        wt, wp, wb = self.weights
        with self._lock:
            # bm25() is "lower is better" (negative); weights follow the column order (UNINDEXED ones: 0)
            rows = self._db.execute(
                f"SELECT rowid, bm25(chunks, 0, 0, 0, 0, {wt:g}, {wp:g}, {wb:g}) AS r FROM chunks WHERE chunks "
                "MATCH ? ORDER BY r LIMIT ?",
                (q, n),
            ).fetchall()
        return [(int(i), -float(r)) for i, r in rows]

    def _dense(self, query: str, n: int) -> list[tuple[int, float]]:
        """(chunk id, cosine) of the ``n`` nearest chunks, the index caught up with the store first."""
        if not query.strip():
            return []
        self._catch_up()
        q = self.embedder.embed([query])[0]
        if not q.any():
            return []
        with self._vlock:
            return self._index.search(q, n)

    def _rows(self, ids: list[int]) -> dict[int, tuple]:
        if not ids:
            return {}
        with self._lock:
            rows = self._db.execute(
                f"SELECT rowid, doc_id, seq, title, body FROM chunks WHERE rowid IN ({','.join('?' * len(ids))})", ids
            ).fetchall()
        return {int(r[0]): r[1:] for r in rows}

    # ---- the vector index ----------------------------------------------------------------------------------------

    @property
    def index_base(self) -> Path:
        """``knowledge.vectors`` beside ``knowledge.db`` (+ ``.faiss`` / ``.json``)."""
        return self.path.with_name(self.path.stem + ".vectors")

    def _catch_up(self) -> dict:
        """Load (or start) the index, then remove the vectors of chunks gone from SQLite and embed the new chunks.
        Returns ``{"removed", "embedded"}``."""
        out = {"removed": 0, "embedded": 0}
        if self.embedder is None:
            return out
        with self._vlock:
            e = self.embedder
            if self._index is None:
                self._index = VectorIndex.load(self.index_base, e.dim, e.identity) or VectorIndex(e.dim, e.identity)
                self._vgen = None
            with self._lock:
                gen = self._meta("generation")
                if gen == self._vgen:
                    return out
                now = {int(r[0]) for r in self._db.execute("SELECT rowid FROM chunks")}
            out["removed"] = self._index.remove(self._index.ids - now)
            new = sorted(now - self._index.ids)
            t0 = time.perf_counter()
            for i in range(0, len(new), EMBED_BATCH):
                rows = self._rows(new[i : i + EMBED_BATCH])
                ids = [j for j in new[i : i + EMBED_BATCH] if j in rows]  # deleted meanwhile: next catch-up
                vecs = e.embed([embed_text(rows[j][0], rows[j][2], rows[j][3]) for j in ids])
                if vecs.shape != (len(ids), self._index.dim):
                    raise VectorError(
                        f"embedder {e.identity} returned vectors of shape {vecs.shape} for "
                        f"{len(ids)} texts; the index has {self._index.dim} dimensions"
                    )
                self._index.add(ids, vecs)
                out["embedded"] += len(ids)
            self._vgen = gen
            if out["removed"] or out["embedded"]:
                self._dirty = True
                log.info(
                    "vector index %s: %d embedded (%.1f s), %d removed, %d vectors",
                    self.index_base,
                    out["embedded"],
                    time.perf_counter() - t0,
                    out["removed"],
                    len(self._index),
                )
            if self._dirty and (out["embedded"] >= 1000 or time.monotonic() - self._saved_at > SAVE_EVERY_S):
                self._save_index()
        return out

    def _save_index(self) -> None:
        """Within ``_vlock``."""
        self._index.save(self.index_base)
        self._saved_at, self._dirty = time.monotonic(), False

    def reindex(self) -> dict:
        """Build the vector index from the chunks in SQLite now (start-up, or after a long offline sync) and save
        it; returns ``{"removed", "embedded", "vectors"}``."""
        out = self._catch_up()
        with self._vlock:
            if self._index is not None:
                if self._dirty:
                    self._save_index()
                out["vectors"] = len(self._index)
        return out

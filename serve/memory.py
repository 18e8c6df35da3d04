"""Per-user memory: short facts a user asked to be remembered, retrieved into that user's prompts only.

Every read and write is scoped by a namespace ``"<api-key id>/<user>"`` built by the HTTP layer (``namespace``), so
one user never sees another's facts, and the same user name under two API keys is two different users. Facts are
ranked by BM25 against the question (SQLite FTS5); when none match, the most recent facts are used.
"""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path

from serve.errors import ServeError
from serve.knowledge import fts_query
from serve.sqlite import open_db

MAX_FACT_CHARS = 1000


class MemoryStoreError(ServeError):
    """Bad memory input; the message says what to do."""


def namespace(key_id: str, user: str) -> str:
    """The private scope of ``user`` under the API key ``key_id`` ("anon" when no keys are configured)."""
    if not isinstance(user, str) or not user.strip() or len(user) > 256:
        raise MemoryStoreError("'user' must be a non-empty string of at most 256 characters")
    return f"{key_id}/{user}"


class MemoryStore:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._db = open_db(
            self.path,
            "CREATE TABLE IF NOT EXISTS facts (id TEXT PRIMARY KEY, ns TEXT NOT NULL, fact TEXT NOT NULL, added_at REAL)",
            "CREATE INDEX IF NOT EXISTS facts_ns ON facts(ns, added_at)",
            "CREATE VIRTUAL TABLE IF NOT EXISTS facts_fts USING fts5(id UNINDEXED, ns UNINDEXED, fact)",
        )

    def add(self, ns: str, fact: str) -> dict:
        if not isinstance(fact, str) or not fact.strip():
            raise MemoryStoreError("'fact' must be a non-empty string")
        if len(fact) > MAX_FACT_CHARS:
            raise MemoryStoreError(
                f"a fact has at most {MAX_FACT_CHARS} characters (got {len(fact)}); keep facts short"
            )
        fid = "mem-" + uuid.uuid4().hex[:16]
        now = time.time()
        with self._lock, self._db:
            self._db.execute("INSERT INTO facts VALUES (?, ?, ?, ?)", (fid, ns, fact.strip(), now))
            self._db.execute("INSERT INTO facts_fts VALUES (?, ?, ?)", (fid, ns, fact.strip()))
        return {"id": fid, "fact": fact.strip(), "created": int(now)}

    def list(self, ns: str) -> list[dict]:
        with self._lock:
            rows = self._db.execute(
                "SELECT id, fact, added_at FROM facts WHERE ns = ? ORDER BY added_at", (ns,)
            ).fetchall()
        return [{"id": i, "fact": f, "created": int(t)} for i, f, t in rows]

    def delete(self, ns: str, fact_id: str) -> bool:
        with self._lock, self._db:
            n = self._db.execute("DELETE FROM facts WHERE ns = ? AND id = ?", (ns, fact_id)).rowcount
            self._db.execute("DELETE FROM facts_fts WHERE ns = ? AND id = ?", (ns, fact_id))
        return n > 0

    def search(self, ns: str, query: str, k: int = 3) -> list[str]:
        """Up to ``k`` of this namespace's facts: BM25 matches first, then the most recent others."""
        if k <= 0:
            return []
        q = fts_query(query)
        with self._lock:
            hits = (
                []
                if not q
                else self._db.execute(
                    "SELECT fact FROM facts_fts WHERE facts_fts MATCH ? AND ns = ? ORDER BY bm25(facts_fts) LIMIT ?",
                    (q, ns, k),
                ).fetchall()
            )
            facts = [h[0] for h in hits]
            if len(facts) < k:
                recent = self._db.execute(
                    "SELECT fact FROM facts WHERE ns = ? ORDER BY added_at DESC LIMIT ?", (ns, k)
                ).fetchall()
                facts += [r[0] for r in recent if r[0] not in facts][: k - len(facts)]
        return facts

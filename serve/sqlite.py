"""One way to open the server's SQLite stores: WAL (several readers beside one writer), usable from many threads."""

from __future__ import annotations

import sqlite3
from pathlib import Path


def open_db(path: Path, *schema: str) -> sqlite3.Connection:
    """Connect to ``path`` (creating its folder), switch to WAL and run the ``CREATE ... IF NOT EXISTS`` statements."""
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(str(path), check_same_thread=False, timeout=30)
    with db:
        db.execute("PRAGMA journal_mode=WAL")
        for stmt in schema:
            db.execute(stmt)
    return db

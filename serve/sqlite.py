"""One way to open the server's SQLite stores: WAL (several readers beside one writer), usable from many threads;
and the one schema migration the stores need: columns added to a table an older version created."""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path

log = logging.getLogger(__name__)


def open_db(path: Path, *schema: str) -> sqlite3.Connection:
    """Connect to ``path`` (creating its folder), switch to WAL and run the ``CREATE ... IF NOT EXISTS`` statements."""
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(str(path), check_same_thread=False, timeout=30)
    with db:
        db.execute("PRAGMA journal_mode=WAL")
        for stmt in schema:
            db.execute(stmt)
    return db


def add_columns(db: sqlite3.Connection, table: str, columns: dict[str, str]) -> list[str]:
    """Add each ``name: type`` column that ``table`` lacks (a store written by an older genloop), in one
    statement each; rows already there get NULL. Returns the names added."""
    have = {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
    missing = [c for c in columns if c not in have]
    for c in missing:
        try:
            with db:
                db.execute(f"ALTER TABLE {table} ADD COLUMN {c} {columns[c]}")
        except sqlite3.OperationalError as e:  # another process opening the same store added it first
            if "duplicate column" not in str(e):
                raise
    if missing:
        log.info("%s: added column(s) %s to an older store", table, ", ".join(missing))
    return missing

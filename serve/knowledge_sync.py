"""``genloop knowledge sync DIR``: make the knowledge store follow a folder (local, or an ``s3://`` / ``gs://`` URI).

One pass (``FolderSync.sync``) lists the folder and compares it with the documents the folder owns in the store:

- a new file is added, a file whose content hash differs from the stored one is replaced, a file whose hash is the
  same is left alone (unchanged), and a document whose file is gone is removed (a rename is one removal and one
  addition); the document id is ``<folder name or --prefix>/<relative path>`` (``serve.knowledge.document_id``),
  the same id ``knowledge add DIR`` gives, so a folder first loaded by hand is taken over without duplicates;
- every write goes through ``KnowledgeStore.apply`` in batches, ONE SQLite transaction per batch: a reader (the
  running server's retriever, which queries the store afresh on every request) sees a whole batch or none of it;
- files that cannot be documents are skipped, counted by reason and listed, never fatal: ``binary``, ``too_large``,
  ``empty`` (their old document, if any, is removed: the file no longer holds usable text), ``unreadable`` (the old
  document is kept: a permission or I/O error says nothing about the content), ``id_conflict`` (the id belongs to a
  document another synced folder owns: give one of them ``--prefix``), ``invalid`` (e.g. a path too long for an id);
- the store records which folder owns each document (``source``), so a sync never removes documents added by hand,
  over HTTP or by another synced folder.

Hidden files and folders (``.git``, ``.cache``, ...) are not looked at. Within one process the syncer remembers each
file's size, mtime and hash, so a ``--watch`` pass re-reads only files whose size or mtime changed (or whose mtime
is too recent to trust, as git does for racily-clean files).
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pyarrow.fs as pafs

from pipelines.artifacts import filesystem, is_uri, join, name
from serve.knowledge import Doc, KnowledgeError, KnowledgeStore, content_hash
from serve.knowledge_files import Unusable, document_id, read_document

log = logging.getLogger(__name__)

RACY_NS = 2_000_000_000  # a file modified within 2 s of being read may change again with the same mtime: re-read it


@dataclass
class FileStat:
    uri: str  # local path or URI, for reading
    size: int
    mtime_ns: int | None  # None when the filesystem does not say (then the file is always read)


@dataclass
class SyncReport:
    """The counts of one pass (or, added up, of several). ``skipped``: ``{"path", "reason", "message"}`` each."""

    added: int = 0
    replaced: int = 0
    removed: int = 0
    unchanged: int = 0
    skipped: list[dict] = field(default_factory=list)
    chunks: int = 0  # chunks written
    batches: int = 0  # transactions committed
    seconds: float = 0.0

    @property
    def changed(self) -> int:
        return self.added + self.replaced + self.removed

    def skipped_by_reason(self) -> dict[str, int]:
        return dict(sorted(Counter(s["reason"] for s in self.skipped).items()))

    def counts(self) -> dict[str, int | dict[str, int]]:
        return {
            "added": self.added,
            "replaced": self.replaced,
            "removed": self.removed,
            "unchanged": self.unchanged,
            "skipped": len(self.skipped),
            "skipped_by_reason": self.skipped_by_reason(),
            "chunks": self.chunks,
            "batches": self.batches,
        }

    def line(self) -> str:
        why = ", ".join(f"{n} {r}" for r, n in self.skipped_by_reason().items())
        return (
            f"{self.added} added, {self.replaced} replaced, {self.removed} removed, {self.unchanged} unchanged, "
            f"{len(self.skipped)} skipped" + (f" ({why})" if why else "")
        )


class FolderSync:
    """Syncs one folder into one store; keep the object across passes (``--watch``) so unchanged files are not
    re-read. ``suffixes`` (e.g. ``(".md", ".txt")``) limits the files looked at; None: every non-hidden file."""

    def __init__(
        self,
        store: KnowledgeStore,
        root: str | Path,
        prefix: str | None = None,
        suffixes: tuple[str, ...] | None = None,
        batch_files: int = 64,
        batch_chars: int = 4_000_000,
    ) -> None:
        if batch_files < 1 or batch_chars < 1:
            raise ValueError(f"batch_files and batch_chars must be >= 1, got {batch_files} and {batch_chars}")
        self.store = store
        self.root = str(root) if is_uri(root) else str(Path(root).resolve())
        self._require_folder()
        # the owner key recorded with every document of this folder; the id prefix (default: the folder's name)
        self.source = self.root
        label = name(self.root) if prefix is None else prefix
        self.prefix = label.strip("/")
        self.suffixes = tuple(s.lower() for s in suffixes) if suffixes else None
        self.batch_files, self.batch_chars = batch_files, batch_chars
        self._cache: dict[str, tuple[int, int, str]] = {}  # rel -> (size, mtime_ns, hash) of a file known synced

    def _require_folder(self) -> None:
        fs, path = filesystem(self.root)
        kind = fs.get_file_info(path).type
        if kind == pafs.FileType.NotFound:
            raise FileNotFoundError(f"{self.root} does not exist; pass the folder the knowledge store should follow")
        if kind != pafs.FileType.Directory:
            raise ValueError(
                f"{self.root} is a file, not a folder; `knowledge sync` follows a folder "
                "(use `knowledge add FILE` for one file)"
            )

    # ---- listing -------------------------------------------------------------------------------------------------

    def _wanted(self, rel: str) -> bool:
        parts = rel.split("/")
        if any(p.startswith(".") for p in parts):
            return False
        return self.suffixes is None or rel.lower().endswith(self.suffixes)

    def scan(self) -> dict[str, FileStat]:
        """``{relative path: FileStat}`` of the files a pass considers, sorted by path."""
        self._require_folder()  # a vanished folder is an error, never "every file was deleted"
        out: dict[str, FileStat] = {}
        if not is_uri(self.root):
            for d, dirs, files in os.walk(self.root, onerror=lambda e: log.warning("cannot list %s", e)):
                dirs[:] = sorted(x for x in dirs if not x.startswith("."))
                for f in files:
                    p = os.path.join(d, f)
                    rel = os.path.relpath(p, self.root).replace(os.sep, "/")
                    if not self._wanted(rel):
                        continue
                    try:
                        st = os.stat(p)  # follows symlinks: a link is synced as the file it points to
                    except OSError:  # a broken link, or deleted since the listing: read_document says why
                        out[rel] = FileStat(p, 0, None)
                        continue
                    if os.path.isfile(p):
                        out[rel] = FileStat(p, st.st_size, st.st_mtime_ns)
        else:
            fs, path = filesystem(self.root)
            for e in fs.get_file_info(pafs.FileSelector(path, recursive=True)):
                rel = e.path[len(path) :].lstrip("/")
                if e.type == pafs.FileType.File and self._wanted(rel):
                    out[rel] = FileStat(join(self.root, *rel.split("/")), e.size or 0, e.mtime_ns)
        return dict(sorted(out.items()))

    # ---- one pass ------------------------------------------------------------------------------------------------

    def _trusted_hash(self, rel: str, st: FileStat, now_ns: int) -> str | None:
        """The remembered hash when the file's size and mtime are what they were when it was read and that mtime
        is old enough to trust."""
        c = self._cache.get(rel)
        if c is None or st.mtime_ns is None or (st.size, st.mtime_ns) != c[:2] or st.mtime_ns > now_ns - RACY_NS:
            return None
        return c[2]

    def sync(self, report: SyncReport | None = None) -> SyncReport:
        """One pass; counts go into ``report`` batch by batch (a pass interrupted by Ctrl-C leaves the counts of
        the batches it committed). Raises FileNotFoundError when the folder itself is gone."""
        report = report if report is not None else SyncReport()
        t0 = time.perf_counter()
        files = self.scan()
        known = self.store.owned(self.source, self.prefix + "/" if self.prefix else "")
        mine = {i for i, (src, _) in known.items() if src == self.source}
        keep: set[str] = set()  # ids of this pass's files whose document stays (or is written)
        puts: list[tuple[str, FileStat, Doc]] = []
        # (rel, stat, hash, id) of unchanged documents added by hand that this folder takes over
        claims: list[tuple[str, FileStat, str, str]] = []
        pending_chars = 0

        def flush(removes: list[str] = ()) -> None:
            nonlocal puts, claims, pending_chars
            if not puts and not claims and not removes:
                return
            r = self.store.apply([d for _, _, d in puts], removes, claim={i: self.source for _, _, _, i in claims})
            report.added += r["added"]
            report.replaced += r["replaced"]
            report.removed += r["removed"]
            report.chunks += r["chunks"]
            report.batches += 1
            for rel, st, d in puts:
                self._remember(rel, st, content_hash(d.text))
            for rel, st, h, _ in claims:
                self._remember(rel, st, h)
            puts, claims, pending_chars = [], [], 0

        now_ns = time.time_ns()
        for rel, st in files.items():
            doc_id = document_id(self.prefix, rel)
            owner, stored = known.get(doc_id, (None, None))
            if doc_id in known and owner not in (None, self.source):
                report.skipped.append(
                    {
                        "path": st.uri,
                        "reason": "id_conflict",
                        "message": f"document id {doc_id!r} belongs to the synced folder {owner}; pass --prefix "
                        "to give this folder's documents other ids",
                    }
                )
                continue
            h = self._trusted_hash(rel, st, now_ns)
            if h is not None and owner == self.source and h == stored:
                keep.add(doc_id)
                report.unchanged += 1
                continue
            try:
                text = read_document(
                    st.uri, self.store.max_document_chars, st.size if st.mtime_ns is not None else None
                )
            except Unusable as e:
                report.skipped.append({"path": st.uri, "reason": e.reason, "message": str(e)})
                self._cache.pop(rel, None)
                if e.reason == "unreadable":
                    keep.add(doc_id)  # keep what the store has: nothing is known about the content
                continue
            keep.add(doc_id)
            h = content_hash(text)
            if h == stored:
                report.unchanged += 1
                if owner == self.source:
                    self._remember(rel, st, h)
                else:
                    claims.append((rel, st, h, doc_id))
            else:
                try:
                    doc = self.store.check(doc_id, text, name(st.uri), self.source)
                except KnowledgeError as e:  # e.g. a path too long for an id
                    report.skipped.append({"path": st.uri, "reason": "invalid", "message": str(e)})
                    keep.discard(doc_id)
                    continue
                puts.append((rel, st, doc))
                pending_chars += len(text)
            if len(puts) + len(claims) >= self.batch_files or pending_chars >= self.batch_chars:
                flush()
        # removals ride with the last writes (a small change, a rename too, is one transaction), the rest in batches
        gone = sorted(mine - keep)
        first = gone[: max(0, self.batch_files - len(puts) - len(claims))]
        flush(first)
        for i in range(len(first), len(gone), self.batch_files):
            flush(gone[i : i + self.batch_files])
        for rel in set(self._cache) - set(files):
            del self._cache[rel]
        report.seconds += time.perf_counter() - t0
        return report

    def _remember(self, rel: str, st: FileStat, h: str) -> None:
        if st.mtime_ns is not None:
            self._cache[rel] = (st.size, st.mtime_ns, h)


def watch(
    sync: FolderSync,
    interval_s: float,
    stop: threading.Event | None = None,
    on_pass: Callable[[int, SyncReport], None] | None = None,
) -> tuple[int, SyncReport, SyncReport]:
    """Sync every ``interval_s`` seconds until ``stop`` is set or Ctrl-C (KeyboardInterrupt, caught here: the
    transaction in flight rolls back, committed batches stay). A pass that fails (folder missing for a moment,
    store locked) is logged and retried at the next interval. ``on_pass(n, report)`` after each pass.

    Returns ``(passes, totals, last)``: ``totals`` adds up added/replaced/removed/chunks over the passes, ``last``
    is the last complete pass (its unchanged and skipped describe the folder as it is now)."""
    if interval_s <= 0:
        raise ValueError(f"--interval must be > 0 seconds, got {interval_s}")
    stop = stop or threading.Event()
    totals, last, passes = SyncReport(), SyncReport(), 0
    try:
        while not stop.is_set():
            report = SyncReport()
            try:
                sync.sync(report)
            except (OSError, ValueError, sqlite3.Error) as e:  # e.g. the folder unmounted, "database is locked"
                log.warning("sync pass failed (%s: %s); retrying in %.3g s", e.__class__.__name__, e, interval_s)
            else:
                passes += 1
                last = report
                if on_pass:
                    on_pass(passes, report)
            finally:
                for k in ("added", "replaced", "removed", "chunks", "batches"):
                    setattr(totals, k, getattr(totals, k) + getattr(report, k))
                totals.seconds += report.seconds
            stop.wait(interval_s)
    except KeyboardInterrupt:
        log.info("knowledge sync: interrupted, stopping")
    return passes, totals, last

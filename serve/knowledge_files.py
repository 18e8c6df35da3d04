"""Files into the knowledge store: which files of folders / globs / URIs are text documents, their ids, and
``add_paths`` (what ``genloop knowledge add`` runs). A file that cannot be a document is skipped with a counted
reason, never fatal. ``serve.knowledge_sync`` follows a folder with the same reading rules."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Iterable

from pipelines.artifacts import is_uri, list_files, name, parent, read_bytes, write_text
from serve.knowledge import TEXT_SUFFIXES, KnowledgeError, KnowledgeStore

log = logging.getLogger(__name__)


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
                if (
                    f.is_file()
                    and f.suffix.lower() in suffixes
                    and not any(part.startswith(".") for part in f.relative_to(p).parts)
                ):
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
            rel = f[len(base) :]
            if (
                rel.lower().endswith(TEXT_SUFFIXES)
                and not any(part.startswith(".") for part in rel.split("/"))
                and f not in seen
            ):
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

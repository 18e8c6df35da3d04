"""The data stage's inputs: which files (local paths, folders, globs, ``s3://`` / ``gs://`` URIs) and how one file
splits into documents (text file | JSONL line | JSON item | Parquet row). Plain functions, no Ray."""

from __future__ import annotations

import fnmatch
import glob
import json
import os
import sysconfig
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipelines.artifacts import filesystem, is_uri

STDLIB = "<stdlib>"
JSONL_EXT = (".jsonl", ".ndjson")
JSON_EXT = (".json",)
PARQUET_EXT = (".parquet",)
RECORD_EXT = JSONL_EXT + JSON_EXT + PARQUET_EXT  # files of records (always the prose profile)


def stdlib_files(extensions: list[str]) -> list[str]:
    """The embedded default corpus: this Python's standard library sources and docs (not site-packages)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "dist-packages", "__pycache__"))
        out += [os.path.join(dirpath, f) for f in filenames if os.path.splitext(f)[1] in extensions]
    return sorted(out)


def list_inputs(inputs: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """(readable files, [(path, reason)] unreadable) for files / folders / globs / URIs, sorted and unique.

    Raises FileNotFoundError naming the first pattern that matches nothing, before any work starts.
    """
    files: set[str] = set()
    unreadable: list[tuple[str, str]] = []
    for pattern in inputs:
        matched = expand(pattern)
        if not matched:
            raise FileNotFoundError(
                f"--input {pattern} matches no files; give existing files, folders, globs or s3:// / gs:// URIs"
            )
        files.update(matched)
    readable = []
    for f in sorted(files):
        if not is_uri(f) and not os.access(f, os.R_OK):
            unreadable.append((f, "unreadable"))
        else:
            readable.append(f)
    return readable, unreadable


def expand(pattern: str) -> list[str]:
    """The files one ``--input`` names: a file, every file under a folder, or a glob's matches (local or URI)."""
    if not is_uri(pattern):
        p = Path(pattern)
        if p.is_dir():
            return [str(f) for f in p.rglob("*") if f.is_file()]
        return [f for f in glob.glob(pattern, recursive=True) if os.path.isfile(f)]
    fs, path = filesystem(pattern)
    scheme = pattern.split("://", 1)[0] + "://"
    has_glob = any(c in path for c in "*?[")
    base = path.split("*", 1)[0].split("?", 1)[0].split("[", 1)[0].rsplit("/", 1)[0] if has_glob else path
    info = fs.get_file_info(base)
    if info.type == pafs.FileType.File and not has_glob:
        return [pattern]
    if info.type != pafs.FileType.Directory:
        return []
    entries = fs.get_file_info(pafs.FileSelector(base, recursive=True))
    names = [e.path for e in entries if e.type == pafs.FileType.File]
    if has_glob:
        names = [n for n in names if fnmatch.fnmatch(n, path)]
    return [scheme + n for n in names]


def split_documents(path: str, data: bytes, text_field: str) -> Iterator[tuple[str, bytes | str | None, str]]:
    """(key, raw document, malformed reason or "") for each document of one file; key = ``"<path>#<index>"``.

    Text / source file -> one document (bytes); JSONL -> one per non-blank line; JSON -> one per list item (or the
    object); Parquet -> one per row of ``text_field``. A broken record is yielded with its reason, never raised.
    """
    low = path.lower()
    if low.endswith(PARQUET_EXT):
        try:
            table = pq.read_table(pa.BufferReader(data))
        except Exception as e:  # pyarrow raises several types for corrupt files
            yield f"{path}#{0:08d}", None, f"bad_parquet: {type(e).__name__}"
            return
        if text_field not in table.column_names:
            yield f"{path}#{0:08d}", None, f"no_text_field: {text_field!r} not in {table.column_names[:8]}"
            return
        for i, v in enumerate(table.column(text_field).to_pylist()):
            yield (f"{path}#{i:08d}", v, "") if isinstance(v, str) else (f"{path}#{i:08d}", None, "no_text_field")
        return
    if low.endswith(JSONL_EXT):
        for i, line in enumerate(data.split(b"\n")):
            if line.strip():
                yield (f"{path}#{i:08d}",) + _json_record(line, text_field)
        return
    if low.endswith(JSON_EXT):
        key = f"{path}#{0:08d}"
        try:
            obj = json.loads(data)
        except (UnicodeDecodeError, ValueError):
            yield key, None, "bad_json"
            return
        items = obj if isinstance(obj, list) else [obj]
        for i, item in enumerate(items):
            text = item.get(text_field) if isinstance(item, dict) else None
            yield (f"{path}#{i:08d}", text, "") if isinstance(text, str) else (f"{path}#{i:08d}", None, "no_text_field")
        return
    yield f"{path}#{0:08d}", data, ""


def _json_record(line: bytes, text_field: str) -> tuple[str | None, str]:
    try:
        obj = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError:
        return None, "invalid_utf8"
    except ValueError:
        return None, "bad_json"
    text = obj.get(text_field) if isinstance(obj, dict) else None
    if not isinstance(text, str):
        return None, "no_text_field"
    return text, ""

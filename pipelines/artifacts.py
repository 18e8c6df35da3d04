"""The artifacts layer: every stage reads its inputs and writes ``--out`` through these functions, so a path may be a
local folder or an ``s3://`` / ``gs://`` URI (pyarrow filesystems; ``AWS_ENDPOINT_URL`` etc. pick the endpoint).

- paths: ``filesystem``, ``join``, ``parent``, ``absolute``, ``exists`` / ``is_dir``, ``list_files``;
- bytes and text: ``read_bytes`` / ``write_bytes``, ``read_text`` / ``write_text``;
- folders: ``upload_dir`` (a local folder to a URI), ``writable_dir`` (a local folder that lands at a URI when the
  block succeeds), ``local_copy`` (a remote folder or file downloaded once into a local cache, keyed by its URI and
  its files' sizes and times, so a changed artifact is fetched again);
- checkpoints: ``resolve_checkpoint`` (a model folder or the artifact holding ``model/``), ``checkpoint_dir`` (that,
  as a local folder: what torch, transformers and vLLM load);
- manifests: every stage writes ``<out>/manifest.json`` (``Manifest``); ``lineage`` walks inputs back to the raw
  corpus, resolving a path inside an artifact (``.../pretrain/model``, ``.../sftd/train.jsonl``) to that artifact.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import logging
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import pyarrow.fs as pafs

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
MODEL_DIR = "model"
CACHE_ENV = "GENLOOP_CACHE_DIR"  # where remote artifacts are downloaded (default ~/.cache/genloop/artifacts)


class ArtifactError(ValueError):
    """A missing, unfinished or already-finished artifact; the message says what to do."""


# ---- paths ---------------------------------------------------------------------------------------------------------


def is_uri(path: str | Path) -> bool:
    """``scheme://...`` (object storage) rather than a local path."""
    return "://" in str(path)


def filesystem(uri: str | Path) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or a ``scheme://`` URI."""
    uri = str(uri)
    if is_uri(uri):
        try:
            return pafs.FileSystem.from_uri(uri)
        except Exception as e:  # pyarrow raises ArrowInvalid / OSError for unknown schemes and bad buckets
            raise ArtifactError(
                f"cannot open {uri} ({e}); use a local path or an s3:// gs:// URI with credentials "
                "and endpoint in the environment (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...)"
            ) from None
    return pafs.LocalFileSystem(), str(Path(uri).resolve())


def absolute(uri: str | None) -> str | None:
    """A local path made absolute (Ray workers run in other directories); URIs and None unchanged."""
    if not uri or is_uri(uri):
        return uri
    return str(Path(uri).resolve())


def join(uri: str | Path, *parts: str) -> str:
    uri = str(uri)
    return "/".join([uri.rstrip("/"), *parts]) if is_uri(uri) else str(Path(uri, *parts))


def parent(uri: str | Path) -> str | None:
    """The folder holding ``uri``; None at a bucket or filesystem root."""
    uri = str(uri)
    if is_uri(uri):
        scheme, rest = uri.split("://", 1)
        rest = rest.rstrip("/")
        return f"{scheme}://{rest.rsplit('/', 1)[0]}" if "/" in rest else None
    p = Path(uri).resolve()
    return str(p.parent) if p.parent != p else None


def name(uri: str | Path) -> str:
    """The last path component."""
    return str(uri).rstrip("/").rsplit("/", 1)[-1]


def _info(uri: str | Path) -> pafs.FileInfo:
    fs, path = filesystem(uri)
    return fs.get_file_info(path)


def exists(uri: str | Path) -> bool:
    return _info(uri).type != pafs.FileType.NotFound


def is_dir(uri: str | Path) -> bool:
    return _info(uri).type == pafs.FileType.Directory


def is_file(uri: str | Path) -> bool:
    return _info(uri).type == pafs.FileType.File


def list_files(uri: str | Path) -> list[str]:
    """Every file under a folder (recursive), as paths / URIs of the same kind as ``uri``, sorted; ``[uri]`` for a
    file; ``[]`` when nothing is there."""
    uri = str(uri)
    fs, path = filesystem(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        return [uri]
    if info.type != pafs.FileType.Directory:
        return []
    entries = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    rels = sorted(e.path[len(path) :].lstrip("/") for e in entries if e.type == pafs.FileType.File)
    return [join(uri, *r.split("/")) for r in rels]


# ---- bytes and text ------------------------------------------------------------------------------------------------


def read_bytes(uri: str | Path) -> bytes:
    fs, path = filesystem(uri)
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"{uri} does not exist") from None


def read_text(uri: str | Path, errors: str = "strict") -> str:
    return read_bytes(uri).decode("utf-8", errors=errors)


NOT_JSON = object()  # what ``jsonl_lines`` yields for a line that is not valid JSON


def jsonl_lines(uri: str | Path) -> Iterator[tuple[int, str, Any]]:
    """(line number, line, parsed object or ``NOT_JSON``) for every non-blank line of a JSONL file (local or URI);
    undecodable bytes are replaced, so a bad line is the caller's to count, never an exception."""
    for i, line in enumerate(read_text(uri, errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield i, line, json.loads(line)
        except json.JSONDecodeError:
            yield i, line, NOT_JSON


def write_bytes(uri: str | Path, data: bytes) -> None:
    fs, path = filesystem(uri)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(data)


def write_text(uri: str | Path, text: str) -> None:
    write_bytes(uri, text.encode())


# ---- folders -------------------------------------------------------------------------------------------------------


def upload_dir(local: str | Path, uri: str | Path) -> None:
    """Copy a local folder's files to ``uri`` (a URI or another local folder), keeping the tree."""
    fs, path = filesystem(uri)
    fs.create_dir(path, recursive=True)
    pafs.copy_files(
        str(Path(local).resolve()), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs
    )


class writable_dir:
    """``with writable_dir(uri) as local:`` a local folder to write into; for a URI it is a temp folder uploaded to
    ``uri`` when the block succeeds (and dropped either way), for a local path the folder itself."""

    def __init__(self, uri: str | Path) -> None:
        self.uri = str(uri)
        self.tmp = tempfile.mkdtemp(prefix="genloop-out-") if is_uri(self.uri) else None

    def __enter__(self) -> str:
        if self.tmp is None:
            Path(self.uri).mkdir(parents=True, exist_ok=True)
        return self.tmp or self.uri

    def __exit__(self, *exc: Any) -> None:
        if self.tmp is None:
            return
        try:
            if exc[0] is None:
                upload_dir(self.tmp, self.uri)
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "genloop" / "artifacts")


def local_copy(uri: str | Path) -> str:
    """A local path holding ``uri``'s content: the path itself when local; for a remote folder or file, a copy in
    the local cache (``GENLOOP_CACHE_DIR``) downloaded once per version: the cache key is the URI plus every file's
    size and modification time, so a rewritten artifact is fetched again. Safe when several processes of one node
    ask at once (each downloads into its own temp folder, the first rename wins)."""
    uri = str(uri)
    if not is_uri(uri):
        return uri
    fs, path = filesystem(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"{uri} does not exist")
    if info.type == pafs.FileType.File:
        entries, base = [info], path.rsplit("/", 1)[0]
    else:
        entries, base = (
            [e for e in fs.get_file_info(pafs.FileSelector(path, recursive=True)) if e.type == pafs.FileType.File],
            path,
        )
    listing = sorted((e.path[len(base) :].lstrip("/"), e.size, str(e.mtime)) for e in entries)
    key = hashlib.sha256(json.dumps([uri, listing]).encode()).hexdigest()[:24]
    target = cache_root() / key
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=target.parent))
        try:
            for rel, _, _ in listing:
                dest = tmp / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                with fs.open_input_stream(f"{base}/{rel}") as src, open(dest, "wb") as out:
                    shutil.copyfileobj(src, out, 1 << 20)
            try:
                os.rename(tmp, target)
                log.info("downloaded %s (%d files) to %s", uri, len(listing), target)
            except OSError:  # another process finished first: theirs is the same content
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return str(target / name(path)) if info.type == pafs.FileType.File else str(target)


# ---- checkpoints ---------------------------------------------------------------------------------------------------


def resolve_checkpoint(uri: str | Path) -> str:
    """A checkpoint folder (local or URI): ``uri`` itself when it holds ``config.json``, else ``<uri>/model`` (what
    pretrain and sft write)."""
    uri = str(uri)
    if exists(join(uri, "config.json")):
        return uri
    if exists(join(uri, MODEL_DIR, "config.json")):
        return join(uri, MODEL_DIR)
    raise ArtifactError(
        f"{uri}: no checkpoint there (expected config.json in it or in {MODEL_DIR}/); pass a model "
        "folder a genloop training stage wrote"
    )


def checkpoint_dir(uri: str | Path) -> str:
    """``resolve_checkpoint(uri)`` as a local folder (downloaded once into the cache when remote)."""
    return local_copy(resolve_checkpoint(uri))


# ---- manifests and lineage -----------------------------------------------------------------------------------------


def code_version() -> str:
    """The git commit of the genloop checkout (with ``-dirty``), or the package version."""
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
        if sha:
            return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return "genloop-0.1.0"


def manifest_digest(uri: str) -> str:
    """sha256 of an artifact's manifest.json: what a downstream manifest records of its inputs."""
    return hashlib.sha256(read_bytes(join(uri, MANIFEST))).hexdigest()


def read_manifest(uri: str) -> dict[str, Any]:
    path = join(uri, MANIFEST)
    if not exists(path):
        raise ArtifactError(f"{uri} is not a genloop artifact (no {MANIFEST}); point at a folder a genloop stage wrote")
    try:
        return json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{path} is corrupt ({e}); re-run the stage that made it") from None


def is_finished(uri: str) -> bool:
    try:
        return read_manifest(uri).get("status") == "finished"
    except ArtifactError:
        return False


def artifact_of(uri: str, levels: int = 2) -> str | None:
    """The artifact folder ``uri`` belongs to: itself when it holds a manifest, else the nearest of its ``levels``
    parents that does (``.../pretrain/model`` -> ``.../pretrain``, ``.../sftd/train.jsonl`` -> ``.../sftd``)."""
    at: str | None = str(uri)
    if at.startswith("<"):  # a placeholder such as <stdlib>, not a path
        return None
    for _ in range(levels + 1):
        if at is None or any(c in name(at) for c in "*?["):  # a glob is no folder
            at = parent(at) if at else None
            continue
        try:
            if exists(join(at, MANIFEST)):
                return at
        except (ArtifactError, OSError):
            return None
        at = parent(at)
    return None


@dataclass
class Manifest:
    """What a stage records about one run; written at start (``running``) and at the end (``finished``)."""

    stage: str
    out: str
    config: dict[str, Any]
    inputs: list[dict[str, str]] = field(default_factory=list)
    counts: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    code_version: str = field(default_factory=code_version)
    started: str = field(default_factory=lambda: dt.datetime.now(dt.timezone.utc).isoformat())
    ended: str | None = None
    status: str = "running"

    @classmethod
    def begin(cls, stage: str, out: str, config: Any, inputs: list[str] = (), overwrite: bool = False) -> "Manifest":
        """Start an artifact at ``out``; refuses to replace a finished one unless ``overwrite``."""
        if is_finished(out) and not overwrite:
            raise ArtifactError(
                f"{out} already holds a finished {read_manifest(out).get('stage')} artifact; "
                "pass --overwrite (overwrite=true) to replace it, or choose another --out"
            )
        cfg = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)
        m = cls(stage=stage, out=out, config=cfg, inputs=[describe_input(i) for i in inputs])
        m.write()
        return m

    def finish(self, counts: dict[str, Any] | None = None, metrics: dict[str, Any] | None = None) -> None:
        self.counts.update(counts or {})
        self.metrics.update(metrics or {})
        self.ended = dt.datetime.now(dt.timezone.utc).isoformat()
        self.status = "finished"
        self.write()

    def write(self) -> None:
        write_text(join(self.out, MANIFEST), json.dumps(dataclasses.asdict(self), indent=2, default=str) + "\n")


def describe_input(uri: str) -> dict[str, str]:
    """An input as a manifest records it: its path; for a path in an artifact, that artifact (when it is not the path
    itself), its stage and its manifest's digest; otherwise ``kind: raw``."""
    entry = {"path": uri}
    art = artifact_of(uri)
    if art is None:
        entry["kind"] = "raw"
        return entry
    if art != uri:
        entry["artifact"] = art
    entry["manifest_sha256"] = manifest_digest(art)
    entry["stage"] = read_manifest(art).get("stage", "?")
    return entry


def lineage(uri: str, _depth: int = 0, _seen: set[str] | None = None) -> Iterator[tuple[int, dict[str, Any]]]:
    """(depth, entry) for the artifact and, recursively, each input back to the raw corpus. An input inside another
    artifact (a checkpoint's ``model/``, an instruction set's ``train.jsonl``) is followed into that artifact; a
    digest that differs from the recorded one is logged (the input changed after this artifact was made)."""
    seen = _seen if _seen is not None else set()
    art = artifact_of(uri) or uri
    m = read_manifest(art)
    yield _depth, {"path": art, "stage": m.get("stage"), "status": m.get("status"), "started": m.get("started")}
    for inp in m.get("inputs", []):
        path = inp["path"]
        target = inp.get("artifact") or artifact_of(path)  # also for manifests that recorded a model/ folder as raw
        if (target or path) in seen:
            continue
        seen.add(target or path)
        if target is not None and exists(join(target, MANIFEST)):
            if "manifest_sha256" in inp and manifest_digest(target) != inp["manifest_sha256"]:
                log.warning("input %s changed since %s was made (manifest digest differs)", target, art)
            yield from lineage(target, _depth + 1, seen)
        else:
            yield _depth + 1, {"path": path, "stage": "raw input"}

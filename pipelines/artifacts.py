"""Artifact folders: every stage writes ``<out>/manifest.json``; ``lineage`` walks inputs back to the raw corpus.

Paths may be local folders or ``s3://`` / ``gs://`` URIs; those go through pyarrow filesystems.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import logging
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import pyarrow.fs as pafs

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"


class ArtifactError(ValueError):
    """A missing, unfinished or already-finished artifact; the message says what to do."""


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or a ``scheme://`` URI."""
    if "://" in uri:
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), str(Path(uri).resolve())


def absolute(uri: str | None) -> str | None:
    """A local path made absolute (Ray workers run in other directories); URIs and None unchanged."""
    if not uri or "://" in uri:
        return uri
    return str(Path(uri).resolve())


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *parts]) if "://" in uri else str(Path(uri, *parts))


def read_text(uri: str) -> str:
    fs, path = filesystem(uri)
    with fs.open_input_stream(path) as f:
        return f.read().decode()


def write_text(uri: str, text: str) -> None:
    fs, path = filesystem(uri)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(text.encode())


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def code_version() -> str:
    """The git commit of the genloop checkout (with ``-dirty``), or the package version."""
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=5,
        ).stdout.strip()
        if sha:
            return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return "genloop-0.1.0"


def manifest_digest(uri: str) -> str:
    """sha256 of an artifact's manifest.json: what a downstream manifest records of its inputs."""
    return hashlib.sha256(read_text(join(uri, MANIFEST)).encode()).hexdigest()


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
    """An input as a manifest records it: path, plus the digest of its manifest when it is an artifact."""
    entry = {"path": uri}
    if exists(join(uri, MANIFEST)):
        entry["manifest_sha256"] = manifest_digest(uri)
        entry["stage"] = read_manifest(uri).get("stage", "?")
    else:
        entry["kind"] = "raw"
    return entry


def lineage(uri: str, _depth: int = 0, _seen: set[str] | None = None) -> Iterator[tuple[int, dict[str, Any]]]:
    """(depth, entry) for the artifact and, recursively, each input back to the raw corpus."""
    seen = _seen if _seen is not None else set()
    m = read_manifest(uri)
    yield _depth, {"path": uri, "stage": m.get("stage"), "status": m.get("status"), "started": m.get("started")}
    for inp in m.get("inputs", []):
        path = inp["path"]
        if path in seen:
            continue
        seen.add(path)
        if "manifest_sha256" in inp and exists(join(path, MANIFEST)):
            now = manifest_digest(path)
            if now != inp["manifest_sha256"]:
                log.warning("input %s changed since %s was made (manifest digest differs)", path, uri)
            yield from lineage(path, _depth + 1, seen)
        else:
            yield _depth + 1, {"path": path, "stage": "raw input"}

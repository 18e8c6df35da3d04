"""ONE lifecycle for every stage that writes an artifact folder ``--out`` (data, sft-data, pretrain, sft, pref-data,
reward, dpo, rlhf)::

    cfg = absolute_paths(cfg, "data", "init_from", "out")       # Ray workers run in other directories
    ...validate the config and inputs (the stage's own plan)...
    run = begin_stage("sft", cfg.out, cfg, inputs={"--init-from": cfg.init_from, "--data": cfg.data},
                      overwrite=cfg.overwrite, resume=True)
    ...train / write into cfg.out...
    run.finish(counts={...}, metrics={...})

``begin_stage`` checks, in this order, and changes nothing until every check passed:

1. every input exists (``--data /x does not exist``); globs and placeholders such as ``<stdlib>`` are the stage's to
   check;
2. ``--out`` is new, empty, or a genloop artifact (it holds ``manifest.json``): a file, or a folder holding files but
   no manifest, is refused with or without ``--overwrite`` and never written into;
3. a finished artifact is refused unless ``overwrite``; so is an artifact of another stage;
4. what the previous run wrote is cleared (everything in ``--out`` but ``manifest.json``, which step 5 rewrites) when
   ``overwrite`` is set, or when the previous run did not finish and the stage cannot resume (``resume=False``).
   A stage that resumes (``resume=True``: the training stages) keeps an unfinished run's files, so the same command
   continues from the newest checkpoint in ``train_runs/``. Clearing is refused when an input lies inside ``--out``
   (fine-tuning the artifact being replaced) or another genloop artifact is nested in it: nothing is lost;
5. the manifest is started (``status: running``, config, inputs with their manifests' digests).

``check_out`` is step 2 and 3 alone (nothing written): the stage commands run it before Ray starts.
``StageRun.finish`` records counts and metrics and marks the artifact ``finished``. A run that fails in between
leaves ``status: running``: an unfinished artifact, resumed or rebuilt by the same command.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence, TypeVar

import pyarrow.fs as pafs

from pipelines.artifacts import (
    MANIFEST,
    ArtifactError,
    Manifest,
    absolute,
    exists,
    filesystem,
    is_dir,
    is_file,
    is_uri,
    join,
    read_manifest,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

Inputs = Mapping[str, "str | Sequence[str] | None"] | Sequence[str]


@dataclass
class StageRun:
    """A begun stage run: its artifact folder and its manifest (``status: running`` until ``finish``)."""

    stage: str
    out: str
    manifest: Manifest
    cleared: int = 0  # entries of a previous run removed from ``out`` (0 when nothing was there or it resumes)

    def finish(self, counts: dict[str, Any] | None = None, metrics: dict[str, Any] | None = None) -> None:
        """Record ``counts`` and ``metrics`` and mark the artifact finished."""
        self.manifest.finish(counts=counts, metrics=metrics)


def absolute_paths(cfg: T, *keys: str) -> T:
    """``cfg`` (a dataclass) with the named path fields made absolute: Ray workers run in other directories.
    Empty fields and URIs stay as they are."""
    return dataclasses.replace(cfg, **{k: absolute(getattr(cfg, k)) or getattr(cfg, k) for k in keys})


def begin_stage(
    stage: str, out: str, config: Any, inputs: Inputs = (), overwrite: bool = False, resume: bool = True
) -> StageRun:
    """Check the inputs and ``out``, clear a previous run when it must go, start the manifest (module docstring).

    ``inputs``: ``{option: path or paths}`` (the option names a missing input in the error; empty values are
    skipped) or a plain list of paths. ``resume``: keep an unfinished run's files (the stage resumes from them)."""
    if not out:
        raise ValueError(f"{stage} needs --out: the folder to write the artifact to")
    named = list(_named_inputs(inputs))
    for option, path in named:
        if _checkable(path) and not exists(path):
            raise FileNotFoundError(f"{stage}: {option} {path} does not exist; pass an existing file or folder")
    paths = [path for _, path in named]
    previous = check_out(stage, out, overwrite)
    cleared = 0
    if previous is not None and (overwrite or not resume):
        cleared = _clear(stage, out, paths, previous)
    elif previous is not None:
        log.info(
            "%s: %s holds an unfinished %s run: continuing it (pass --overwrite to start afresh)", stage, out, stage
        )
    manifest = Manifest.begin(stage, out, config, inputs=paths, overwrite=overwrite)
    return StageRun(stage, out, manifest, cleared)


# ---- checks --------------------------------------------------------------------------------------------------------
def _named_inputs(inputs: Inputs) -> Iterable[tuple[str, str]]:
    """(option, path) pairs in order, empty values dropped."""
    if isinstance(inputs, Mapping):
        for option, value in inputs.items():
            for path in [value] if isinstance(value, str) else (value or []):
                if path:
                    yield option, str(path)
    else:
        for path in inputs:
            if path:
                yield "input", str(path)


def _checkable(path: str) -> bool:
    """A plain path or URI (not a glob, not a placeholder such as ``<stdlib>``): the lifecycle checks it exists."""
    return not path.startswith("<") and not any(c in path for c in "*?[")


def check_out(stage: str, out: str, overwrite: bool) -> dict[str, Any] | None:
    """The manifest of the genloop artifact already at ``out`` (None when ``out`` is new, empty or not given);
    raises when ``out`` is something genloop must not touch, or a finished / other stage's artifact without
    ``overwrite``. Writes nothing: the stage commands call it before Ray starts, ``begin_stage`` again."""
    if not out:
        return None
    if is_file(out):
        raise ArtifactError(f"--out {out} is a file; pass a folder (new, empty, or a genloop artifact)")
    if not is_dir(out):
        return None
    if not exists(join(out, MANIFEST)):
        if _entries(out):
            raise ArtifactError(
                f"--out {out} holds files but no {MANIFEST}: it is not a genloop artifact, so genloop "
                "neither writes into it nor clears it (also with --overwrite); choose a new or empty "
                "folder"
            )
        return None
    try:
        previous = read_manifest(out)
    except ArtifactError:  # a corrupt manifest.json: genloop wrote it, the run that did died mid-write
        previous = {"stage": "?", "status": "corrupt"}
    if not overwrite:
        if previous.get("status") == "finished":
            raise ArtifactError(
                f"{out} already holds a finished {previous.get('stage')} artifact; pass --overwrite "
                "(overwrite=true) to replace it, or choose another --out"
            )
        if previous.get("stage") != stage:
            raise ArtifactError(
                f"{out} holds an unfinished {previous.get('stage')} artifact, not a {stage} one; pass "
                "--overwrite (overwrite=true) to replace it, or choose another --out"
            )
    return previous


def _inside(path: str, folder: str) -> bool:
    """Is ``path`` ``folder`` itself or under it (both absolute paths, or URIs)?"""
    if is_uri(path) or is_uri(folder):
        return path.rstrip("/") == folder.rstrip("/") or path.startswith(folder.rstrip("/") + "/")
    p, f = Path(path).resolve(), Path(folder).resolve()
    return p == f or f in p.parents


def _entries(out: str) -> list[pafs.FileInfo]:
    """The top-level entries of a folder (local or URI)."""
    fs, base = filesystem(out)
    return fs.get_file_info(pafs.FileSelector(base, recursive=False))


def _clear(stage: str, out: str, inputs: Sequence[str], previous: dict[str, Any]) -> int:
    """Remove everything a previous run wrote in ``out`` except ``manifest.json`` (rewritten next, so the folder
    stays a genloop artifact if this is interrupted); refused when that would remove an input or another artifact."""
    for path in inputs:
        if _checkable(path) and _inside(absolute(path) or path, out):
            raise ArtifactError(
                f"{stage}: input {path} is inside --out {out}, which --overwrite would clear; copy it "
                "elsewhere first, or choose another --out"
            )
    fs, base = filesystem(out)
    entries = _entries(out)
    top = f"{base.rstrip('/')}/{MANIFEST}"
    nested = [
        e.path
        for e in fs.get_file_info(pafs.FileSelector(base, recursive=True))
        if e.type == pafs.FileType.File and e.base_name == MANIFEST and e.path != top
    ]
    if nested:
        raise ArtifactError(
            f"{out} holds another genloop artifact ({nested[0].rsplit('/', 1)[0]}), which clearing "
            f"{out} would delete; move it out first, or choose another --out"
        )
    removed = 0
    for e in entries:
        if e.base_name == MANIFEST:
            continue
        if e.type == pafs.FileType.Directory:
            fs.delete_dir(e.path)
        else:
            fs.delete_file(e.path)
        removed += 1
    log.info(
        "%s: cleared %d entries of the previous %s %s run in %s",
        stage,
        removed,
        previous.get("status"),
        previous.get("stage"),
        out,
    )
    return removed

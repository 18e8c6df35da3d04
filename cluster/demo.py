"""``make demo``: every stage end to end on the embedded corpus (the stdlib), on one embedded local Ray.

Each step is an ordinary ``genloop`` command, run in this process so that one local Ray serves them all. A step
whose artifact is already finished is skipped, so re-running the demo resumes where it stopped. ``--fresh`` starts
over. Outputs go to ``runs/demo/`` (``--out`` to change).
"""

from __future__ import annotations

import logging
import shutil
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

from cluster.cli import main as genloop
from pipelines.artifacts import is_finished

log = logging.getLogger("genloop.demo")


@dataclass
class Step:
    name: str
    args: list[str]
    artifact: str | None  # folder whose finished manifest means "done"; None = always run


def steps(out: Path, preset: str) -> list[Step]:
    d = str(out)
    stdlib = sysconfig.get_paths()["stdlib"]
    return [
        Step("data", ["data", "--config", preset, "--out", f"{d}/data"], f"{d}/data"),
        Step("pretrain", ["pretrain", "--config", preset, "--data", f"{d}/data", "--out", f"{d}/pretrain"],
             f"{d}/pretrain"),
        Step("sft-data", ["sft-data", "--config", preset, "--out", f"{d}/sft-data"], f"{d}/sft-data"),
        Step("sft", ["sft", "--config", preset, "--init-from", f"{d}/pretrain", "--data", f"{d}/sft-data",
                     "--out", f"{d}/sft"], f"{d}/sft"),
        Step("knowledge", ["knowledge", "add", f"{stdlib}/json", f"{stdlib}/http", "--store", f"{d}/serve"], None),
        Step("serve", ["serve", "--config", preset, "--model", f"{d}/sft", "--knowledge", f"{d}/serve",
                       "--smoke", "4"], None),
        Step("feedback", ["feedback", "export", "--store", f"{d}/serve/feedback.db",
                          "--out", f"{d}/serve/prefs.jsonl"], None),
        Step("lineage", ["lineage", f"{d}/sft"], None),
    ]


def run(out: Path, preset: str = "demo", fresh: bool = False, only: list[str] | None = None) -> int:
    if fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    timings: list[tuple[str, str, float]] = []
    t_all = time.perf_counter()
    for step in steps(out, preset):
        if only and step.name not in only:
            continue
        if step.artifact and is_finished(step.artifact):
            log.info("== %s: already finished at %s, skipping", step.name, step.artifact)
            timings.append((step.name, "skipped", 0.0))
            continue
        log.info("== %s: genloop %s", step.name, " ".join(step.args))
        t = time.perf_counter()
        rc = genloop(step.args)
        timings.append((step.name, "ok" if rc == 0 else f"failed ({rc})", time.perf_counter() - t))
        if rc != 0:
            break
    print("\n  step        status      seconds")
    for name, status, secs in timings:
        print(f"  {name:11s} {status:11s} {secs:7.1f}")
    print(f"  total                   {time.perf_counter() - t_all:7.1f}")
    return 0 if all(s in ("ok", "skipped") for _, s, _ in timings) else 1

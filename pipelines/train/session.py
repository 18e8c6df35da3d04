"""Where a training worker runs: a Ray Train worker (``RaySession``) or this process (``LocalSession``, the
single-process reference). The worker loop asks its session for rank/world and the checkpoint to resume from, and
hands it metrics + checkpoints. (Its rows come from the run's row stores through ``pipelines/train/loader.py``.)
Every learner on Ray Train uses it: the shared loop (``pipelines/train/worker.py``) and RLHF's learner
(``pipelines/rlhf/loop.py``); so does their fault injection, ``fail_once``."""

from __future__ import annotations

import logging
import os
import shutil
from typing import Any

from pipelines.train.config import LOOP_STATE

log = logging.getLogger(__name__)


class Session:
    """What the worker loop needs from its runner: rank/world, checkpoints, report."""

    rank = 0
    world = 1

    def latest_checkpoint(self) -> str | None: ...
    def report(self, metrics: dict, ckpt_dir: str | None, step: int) -> None: ...

    def release_checkpoint(self) -> None:
        """The checkpoint ``latest_checkpoint`` gave is loaded: its folder may go."""


class RaySession(Session):
    def __init__(self, resume_dir: str | None = None) -> None:
        import ray.train

        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self._train = ray.train
        self.resume_dir = resume_dir

    def latest_checkpoint(self):
        ckpt = self._train.get_checkpoint()
        if ckpt is None:
            return self.resume_dir
        # storage is a local or mounted path here (a cloud URI is downloaded by as_directory)
        self._ckpt_ctx: Any = ckpt.as_directory()
        return self._ckpt_ctx.__enter__()

    def release_checkpoint(self) -> None:
        ctx, self._ckpt_ctx = getattr(self, "_ckpt_ctx", None), None
        if ctx is not None:
            ctx.__exit__(None, None, None)

    def report(self, metrics, ckpt_dir, step):
        from ray.train import Checkpoint

        ckpt = Checkpoint.from_directory(ckpt_dir) if ckpt_dir else None
        self._train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=f"step_{step:08d}" if ckpt else None)


class LocalSession(Session):
    """In-process run (strategy none, one worker): the reference the distributed runs are checked against."""

    def __init__(self, run_dir: str) -> None:
        self.run_dir = run_dir

    def latest_checkpoint(self):
        return latest_checkpoint_dir(self.run_dir)

    def report(self, metrics, ckpt_dir, step):
        if ckpt_dir:
            target = os.path.join(self.run_dir, f"step_{step:08d}")
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(ckpt_dir, target)


def latest_checkpoint_dir(run_dir: str) -> str | None:
    """The newest complete ``step_*`` checkpoint under a run folder (complete = has loop_state.json)."""
    if not os.path.isdir(run_dir):
        return None
    done = sorted(
        d for d in os.listdir(run_dir) if d.startswith("step_") and os.path.exists(os.path.join(run_dir, d, LOOP_STATE))
    )
    return os.path.join(run_dir, done[-1]) if done else None


def fail_once(marker: str, what: str) -> None:
    """Fault injection for the restart paths: the first call for ``marker`` (a path, local or URI) writes it and
    exits this process at once (a dead worker, rank or actor); later calls (after the restart) return."""
    from pipelines.artifacts import exists, write_text

    if exists(marker):
        return
    write_text(marker, f"{what} killed here by fault injection\n")
    log.warning("fault injection: this %s exits now (%s)", what, marker)
    os._exit(1)

"""THE shared training loop (pretraining, domain fine-tuning, SFT, reward model, DPO) on Ray Train: DDP | FSDP2 |
single process.

Interface (stable; every training stage calls it)::

    result = fit(cfg: TrainLoopConfig,
                 build_model: Callable[[], nn.Module],        # runs on every worker: fresh model or load_checkpoint
                 train_ds: ray.data.Dataset | dict[str, np.ndarray],   # rows, in a fixed order
                 val_ds: ray.data.Dataset | dict[str, np.ndarray] | None,
                 out: str,                                    # artifact folder (local path or s3:// / gs://)
                 export: Callable[[nn.Module, dict, str], str] | None = None,
                 eval_hook: Callable[[nn.Module, int], dict] | None = None,
                 tokenizer: str | None = None,
                 objective: Objective | None = None) -> FitResult   # default LMObjective

Rows of ``train_ds`` / ``val_ds`` hold the objective's columns, every row the same length. For the default
``LMObjective``: ``input_ids`` and ``labels`` (-100 = no loss), optional ``position_ids`` and ``doc_ids`` (packed
samples; both go to ``Transformer.forward``). Preference objectives (``pipelines/prefs/objectives.py``) read
``chosen_ids``/``rejected_ids`` and their own columns.

* Loss: the objective returns ``(loss_sum, count, metric_sums)`` per micro-batch (``pipelines/train/objective.py``);
  the loop divides by the global unit count of the WHOLE global batch (micro-batches x accumulation x workers: tokens
  for LM, pairs for preferences; the row store holds every row's units, so each rank sums its global batch's count
  itself: no all-reduce for it), and multiplies by the world size because DDP/FSDP2 average gradients. So 2 workers == 1
  process.
* Data: the driver writes the rows once, streaming, into the run's row stores ``<out>/train_runs/<name>-rows/
  {train,val}`` (``pipelines/train/row_store.py``: one fixed-width file per column, plus each row's loss units); the
  workers read them by random access (``pipelines/train/loader.py``, Megatron's global sample index): each epoch is a
  seeded permutation of the rows (with ``shuffle``), global batch ``g`` is the next B samples of that stream (B =
  ``global_rows()``: micro x accum x workers, or ``global_batch_size``), rank r reads only its places ``r*A + [0, A)``
  of it (A = B / workers) with ``prefetch_batches`` batches of read-ahead. Worker memory does not grow with the
  corpus; the order does not depend on the number of workers; a checkpoint records ``consumed_samples`` and a
  resumed run continues there with nothing repeated or skipped, also at another ``num_workers`` (set
  ``global_batch_size`` to keep B when the worker count changes).
* Only parameters with ``requires_grad`` are optimised (AdamW, fused on CUDA; weight decay on matrices only),
  warmup + cosine to ``min_lr``, clipping, accumulation, fixed seed.
* Checkpoints every ``ckpt_every`` steps and at the end via ``ray.train.report(checkpoint=...)``: a torch distributed
  checkpoint (sharded under FSDP) of model + optimizer + ``loop_state.json`` (step, metric history). Ray Train
  restarts failed workers (``FailureConfig(max_failures)``) from the latest; re-running the same command (same
  ``out``) resumes from the run folder ``<out>/train_runs/<name>`` (``run_trainer``). The loop itself never clears
  it: a stage's ``--overwrite`` does, before the loop starts (``pipelines/lifecycle.py``).
* Metrics every ``log_every`` steps (loss and the objective's metrics, lr, grad_norm, tokens/s, MFU) and every
  ``eval_every`` (val_loss and ``val_*`` metrics, val_ppl for LM, plus whatever ``eval_hook(model, step)`` returns; it
  runs on every rank and rank 0's dict is kept) go to ``<out>/metrics.jsonl``, ``<out>/metrics.csv`` and
  ``<out>/loss_curve.png``; tqdm bar on rank 0 (its postfix appears at the first measurement). A period of 0 means
  "only at the last step" for all three of ``log_every``/``eval_every``/``ckpt_every``.
* Export at the end: rank 0 calls ``export(unwrapped_model, full_state_dict, out)`` (default ``hf_export``:
  ``save_checkpoint`` into ``<out>/model`` with ``tokenizer``).

Modules of ``pipelines/train/`` (split at their seams): ``config`` (TrainLoopConfig, FitResult), ``schedule`` (the
lr schedule), ``objective`` (Objective, LMObjective, token_loss_sum, IGNORE), ``row_store`` and ``loader`` (the rows
on disk and each rank's reads), ``session`` (Ray and in-process sessions, fault injection), ``state`` (optimizer, dcp
checkpoint save/load, export), ``worker`` (the per-worker loop, fed a ``TrainSpec``), ``metrics`` (metrics files and
curves), this module (the driver: ``fit``; ``run_trainer``, the Ray Train job every learner runs, RLHF's included).
The names below are re-exported here for callers.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Protocol

import torch.nn as nn

from pipelines.artifacts import exists, join, read_text
from pipelines.train.config import LOOP_STATE, MODEL_DIR, RUNS_DIR, FitResult, TrainLoopConfig
from pipelines.train.objective import IGNORE, LMObjective, Objective, token_loss_sum
from pipelines.train.row_store import RowStore, array_batches, dataset_batches, store_path, write_rows
from pipelines.train.schedule import lr_at
from pipelines.train.session import LocalSession, latest_checkpoint_dir
from pipelines.train.state import (
    build_optimizer,
    full_state_dict,
    hf_export,
    load_train_state,
    local_dir,
    save_train_state,
)
from pipelines.train.worker import COLUMNS, TrainSpec, train_worker

__all__ = [
    "COLUMNS",
    "IGNORE",
    "LOOP_STATE",
    "MODEL_DIR",
    "RUNS_DIR",
    "FitResult",
    "LMObjective",
    "Objective",
    "TrainLoopConfig",
    "TrainSpec",
    "build_optimizer",
    "check_placement",
    "config_dict",
    "fit",
    "full_state_dict",
    "hf_export",
    "latest_checkpoint_dir",
    "load_train_state",
    "local_dir",
    "lr_at",
    "read_history",
    "run_trainer",
    "save_train_state",
    "stage_rows",
    "token_loss_sum",
    "train_worker",
]

log = logging.getLogger(__name__)


# ---- the driver ----------------------------------------------------------------------------------------------------
def fit(
    cfg: TrainLoopConfig,
    build_model: Callable[[], nn.Module],
    train_ds,
    val_ds,
    out: str,
    export: Callable[[nn.Module, dict, str], str] | None = None,
    eval_hook: Callable[[nn.Module, int], dict] | None = None,
    tokenizer: str | None = None,
    in_process: bool = False,
    objective: Objective | None = None,
) -> FitResult:
    """Train ``build_model()`` on ``train_ds`` with ``objective`` (default ``LMObjective``) and return the final
    metrics (see the module docstring).

    ``in_process=True`` (strategy none, one worker) runs the loop in this process without Ray Train — the
    single-process reference; otherwise a ``TorchTrainer`` runs ``num_workers`` workers.
    """
    cfg.validate()
    if in_process and (cfg.num_workers != 1 or cfg.strategy != "none"):
        raise ValueError("in_process=True runs one process: set train.num_workers=1 and train.strategy=none")
    run_dir = join(out, RUNS_DIR)
    objective = objective or LMObjective()
    train_store = stage_rows(train_ds, store_path(run_dir, cfg.name, "train"), objective, "training rows")
    if len(train_store) < cfg.global_rows():
        raise ValueError(
            f"the training split has {len(train_store)} rows, fewer than one global batch "
            f"({cfg.global_rows()} rows: micro_batch_size x grad_accum x num_workers, or "
            "global_batch_size); lower them or add data"
        )
    val_store = (
        stage_rows(val_ds, store_path(run_dir, cfg.name, "val"), objective, "validation rows")
        if val_ds is not None
        else None
    )
    spec = TrainSpec(
        cfg=cfg,
        build_model=build_model,
        out=out,
        train_store=train_store,
        objective=objective,
        export=export,
        eval_hook=eval_hook,
        tokenizer=tokenizer,
        val_store=val_store,
    )
    if in_process:
        local_run = os.path.join(run_dir, cfg.name)
        os.makedirs(local_run, exist_ok=True)
        train_worker({"spec": spec, "session": LocalSession(local_run)})
        ckpt = latest_checkpoint_dir(local_run)
    else:
        ckpt = _fit_ray(spec, run_dir)
    history = read_history(out)
    last: dict[str, Any] = {}
    for r in history:
        last.update(r)
    model_dir = join(out, MODEL_DIR) if exists(join(out, MODEL_DIR, "config.json")) else None
    return FitResult(
        out=out, steps=int(last.get("step", 0)), metrics=last, history=history, model_dir=model_dir, checkpoint=ckpt
    )


def check_placement(cfg: TrainLoopConfig, use_gpu: bool) -> None:
    """Fail up front when the cluster cannot place ``num_workers`` workers (instead of waiting forever)."""
    from pipelines.resources import check_placement as check

    check(
        "training",
        [("workers", cfg.num_workers, cfg.cpus_per_worker, 1)],
        use_gpu,
        "lower --num-workers (train.num_workers)",
    )


def stage_rows(rows: Any, path: str, objective: Objective, what: str) -> RowStore:
    """Write a Ray Dataset (streamed in its fixed order, bounded memory) or in-memory rows ``{column: (N, ...)}``
    into the row store at ``path`` that the workers read (the objective's columns + each row's loss units)."""
    if isinstance(rows, RowStore):
        return rows
    batches = array_batches(rows) if isinstance(rows, dict) else dataset_batches(rows)
    store = write_rows(batches, path, objective, what)
    log.info("%s: %d rows (%.1f MB) staged in %s", what, len(store), store.nbytes() / 1e6, path)
    return store


def _fit_ray(spec: TrainSpec, run_dir: str) -> str | None:
    from pipelines.runtime import use_gpu_default

    cfg = spec.cfg
    use_gpu = use_gpu_default() if cfg.use_gpu is None else cfg.use_gpu
    check_placement(cfg, use_gpu)
    result = run_trainer(train_worker, {"spec": spec}, cfg, run_dir, cfg.name, use_gpu)
    return result.checkpoint.path if result.checkpoint else None


class WorkerGroup(Protocol):
    """What ``run_trainer`` reads of a learner's config (``TrainLoopConfig``, RLHF's ``LearnerConfig``)."""

    num_workers: int
    cpus_per_worker: int
    max_failures: int
    keep_checkpoints: int


def run_trainer(
    worker: Callable[[dict], None],
    loop_config: dict[str, Any],
    group: WorkerGroup,
    run_dir: str,
    name: str,
    use_gpu: bool,
) -> Any:
    """Run ``worker(loop_config)`` on ``group.num_workers`` Ray Train workers (``cpus_per_worker`` CPUs each, one GPU
    each when ``use_gpu``; gloo or NCCL) with checkpoints in ``<run_dir>/<name>`` (``keep_checkpoints`` kept; Ray
    Train restarts failed workers from the newest, ``max_failures`` times). A re-run after the whole job died
    resumes: ``loop_config["resume_dir"]`` is then the newest complete checkpoint there (the workers start from it
    unless Ray Train hands them a newer one). Returns Ray's ``Result``; raises the run's error."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    if "://" not in run_dir and (latest := latest_checkpoint_dir(os.path.join(run_dir, name))):
        log.info("resuming from %s (re-run of %s)", latest, name)
        loop_config = {**loop_config, "resume_dir": latest}
    trainer = TorchTrainer(
        worker,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=group.num_workers, use_gpu=use_gpu, resources_per_worker={"CPU": group.cpus_per_worker}
        ),
        run_config=RunConfig(
            name=name,
            storage_path=_storage_path(run_dir),
            failure_config=FailureConfig(max_failures=group.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=max(1, group.keep_checkpoints)),
        ),
    )
    result = trainer.fit()
    if result.error:
        raise result.error
    return result


def _storage_path(run_dir: str) -> str:
    if "://" in run_dir:
        return run_dir
    os.makedirs(run_dir, exist_ok=True)
    return str(Path(run_dir).resolve())


def read_history(out: str) -> list[dict[str, Any]]:
    """The rows of ``<out>/metrics.jsonl`` (what ``write_metrics`` wrote: one per logged step or RLHF iteration);
    [] before the first."""
    path = join(out, "metrics.jsonl")
    if not exists(path):
        return []
    return [json.loads(line) for line in read_text(path).splitlines() if line.strip()]


def config_dict(cfg: TrainLoopConfig) -> dict[str, Any]:
    return asdict(cfg)

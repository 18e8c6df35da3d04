"""The per-worker training loop (Ray Train's ``train_loop_per_worker``, or in-process with a ``LocalSession``), fed a
typed ``TrainSpec``. The loop's contract (data order, loss normalisation, checkpoints) is in
``pipelines/train_loop.py``'s docstring."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from pipelines.artifacts import exists, join
from pipelines.train_config import TrainLoopConfig
from pipelines.train_objective import LMObjective, Objective
from pipelines.train_schedule import batch_order, lr_at, rank_row_mask, row_positions
from pipelines.train_session import RaySession, Session
from pipelines.train_state import build_optimizer, full_state_dict, hf_export, load_train_state, save_train_state

log = logging.getLogger(__name__)

COLUMNS = LMObjective.columns


@dataclass
class TrainSpec:
    """Everything a worker needs (pickled to every Ray Train worker)."""

    cfg: TrainLoopConfig
    build_model: Callable[[], nn.Module]  # runs on every worker: a fresh model or a loaded checkpoint
    out: str  # artifact folder (metrics, export)
    n_train_rows: int
    objective: Objective
    export: Callable[[nn.Module, dict, str], str] | None = None
    eval_hook: Callable[[nn.Module, int], dict] | None = None
    tokenizer: str | None = None  # for the default export (hf_export) when ``export`` is None
    has_val: bool = False
    resume_dir: str | None = None  # a checkpoint to start from when Ray Train has none (re-run of a dead job)


def peak_memory_bytes(device: torch.device) -> float:
    """This rank's peak memory so far: allocated tensors on a GPU, the process's peak RSS on CPU (what `genloop
    plan` predicts per rank)."""
    if device.type == "cuda":
        return float(torch.cuda.max_memory_allocated(device))
    import resource

    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


# ---- data on a worker ----------------------------------------------------------------------------------------------

def load_rank_rows(source: Any, global_rows: int, rank: int, rows_per_rank: int,
                   limit: int | None = None, positions: np.ndarray | None = None,
                   objective: Objective | None = None) -> dict[str, np.ndarray]:
    """Read ``source`` (Dataset or DataIterator) in order, keeping this rank's rows in the order of their places
    (``positions``, see ``row_positions``; without them: the first ``limit`` rows in dataset order):
    {column: (N_rank, ...)} for the objective's columns (ints as int64, float columns as the objective says)."""
    objective = objective or LMObjective()
    kept: dict[str, list[np.ndarray]] = {}
    places: list[np.ndarray] = []
    seen = 0
    if positions is None:
        if limit is None:
            raise ValueError("load_rank_rows needs the rows' positions (row_positions) or a row limit")
        positions = np.arange(limit)
    n_all = len(positions)
    # complete global batches are judged against the whole count, not the rows seen so far
    full_mask = rank_row_mask(n_all, global_rows, rank, rows_per_rank, positions)
    for batch in source.iter_batches(batch_size=1024, batch_format="numpy"):
        objective.check_columns(set(batch), "training rows")
        cols = {k: _stack(v) for k, v in batch.items() if k in objective.columns}
        n = len(cols[objective.required[0]])
        if limit is not None:
            n = min(n, max(0, limit - seen))
        if seen + n > n_all:
            raise ValueError(f"the dataset yielded more rows than the {n_all} it counted; was it changed while "
                             "training started?")
        mask = full_mask[seen:seen + n]
        places.append(positions[seen:seen + n][mask])
        for k, v in cols.items():
            kept.setdefault(k, []).append(v[:n][mask])
        seen += n
        if limit is not None and seen >= limit:
            break
    if not kept:
        return {}
    order = np.argsort(np.concatenate(places), kind="stable")
    return {k: np.concatenate(v).astype(objective.dtypes.get(k, np.int64))[order] for k, v in kept.items()}


def _stack(col: np.ndarray) -> np.ndarray:
    if col.dtype == object:
        lengths = {len(x) for x in col}
        if len(lengths) > 1:
            raise ValueError(f"training rows must all have the same length; got lengths {sorted(lengths)[:5]}")
        return np.stack(col)
    return col


def tensors(rows: dict[str, np.ndarray], sl: slice, device: torch.device) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v[sl]).to(device) for k, v in rows.items()}


def all_sum(values: list[float], device: torch.device, world: int) -> list[float]:
    """All-reduce SUM (never AVG: gloo's AVG is a SUM, pytorch#162338) of a few floats."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if world > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def worker_device(cfg: TrainLoopConfig) -> torch.device:
    """This worker's device: its CUDA device when it has one (and GPUs are not turned off), else the CPU with
    ``cpus_per_worker`` torch threads."""
    if torch.cuda.is_available() and cfg.use_gpu is not False:
        return torch.device("cuda", torch.cuda.current_device())
    torch.set_num_threads(cfg.cpus_per_worker)
    return torch.device("cpu")


# ---- the per-worker loop -------------------------------------------------------------------------------------------
def train_worker(config: dict) -> None:
    """Ray Train's ``train_loop_per_worker``: ``config = {"spec": TrainSpec}`` (+ ``"session"`` in process)."""
    spec: TrainSpec = config["spec"]
    session: Session = config.get("session") or RaySession(spec.has_val, spec.resume_dir)
    run_worker(spec, session)


def run_worker(spec: TrainSpec, session: Session) -> None:
    from models.parallel import set_gradient_sync, wrap_model
    from pipelines.metrics import device_peak_flops, mfu, plot_loss, write_metrics

    cfg, obj = spec.cfg, spec.objective
    rank, world = session.rank, session.world
    device = worker_device(cfg)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False  # the loop has its own bar

    A = cfg.micro_batch_size * cfg.grad_accum
    B = A * world
    positions = row_positions(spec.n_train_rows, cfg.seed, cfg.shuffle)
    rows = load_rank_rows(session.train_rows(), B, rank, A, positions=positions, objective=obj)
    n_batches = len(rows[obj.required[0]]) // A if rows else 0
    if n_batches == 0:
        raise ValueError(f"the training split has fewer rows than one global batch ({B} = micro_batch_size "
                         f"{cfg.micro_batch_size} x grad_accum {cfg.grad_accum} x workers {world}); lower them")
    val_rows = _load_val(session, cfg, rank, world, obj)
    seq_len = obj.seq_len(rows)
    row_tokens = obj.row_tokens(rows)
    # loss units of every global batch, summed over ranks once here instead of a blocking all-reduce per step
    local_counts = obj.row_counts({k: v[:n_batches * A] for k, v in rows.items()}).reshape(n_batches, -1).sum(axis=1)
    batch_units = all_sum(local_counts.astype(np.float64).tolist(), device, world)

    base = spec.build_model()
    model = wrap_model(base, cfg.strategy, device, cfg.activation_checkpointing, cfg.compile,
                       reshard_after_forward=cfg.fsdp_reshard_after_forward)
    opt = build_optimizer(model, cfg)
    params = [p for p in model.parameters() if p.requires_grad]

    start, history = 0, []
    ckpt_dir = session.latest_checkpoint()
    if ckpt_dir:
        state = load_train_state(ckpt_dir, model, opt)
        start, history = int(state["step"]), list(state["history"])
        log.info("rank %d: resumed from %s at step %d", rank, ckpt_dir, start)

    flops_tok = base.cfg.flops_per_token(seq_len) if hasattr(base, "cfg") else 0.0
    peak = device_peak_flops(device)
    bar = None
    if rank == 0 and cfg.progress and start < cfg.steps:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, initial=start, desc=cfg.name, mininterval=2.0, dynamic_ncols=True)

    last: dict[str, Any] = dict(history[-1]) if history else {}
    t_window, tok_window = time.perf_counter(), 0
    for step in range(start, cfg.steps):
        if cfg.inject_failure_at and step == cfg.inject_failure_at and rank == world - 1:
            _maybe_fail(spec.out, step)
        epoch, j = divmod(step, n_batches)
        g = int(batch_order(n_batches, cfg.seed, epoch, cfg.shuffle)[j])
        lr = lr_at(step, cfg)
        for group in opt.param_groups:
            group["lr"] = lr
        model.train()
        global_units = max(1.0, batch_units[g])
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        metric_sums: dict[str, torch.Tensor] = {}
        for k in range(cfg.grad_accum):
            lo = g * A + k * cfg.micro_batch_size
            b = tensors(rows, slice(lo, lo + cfg.micro_batch_size), device)
            with set_gradient_sync(model, cfg.strategy, k == cfg.grad_accum - 1):
                loss, _, metrics = obj(model, b)
                # DDP/FSDP2 average gradients over ranks: x world makes it the global-batch unit mean
                (loss * (world / global_units)).backward()
            loss_sum += loss.detach().double()
            for name, v in metrics.items():
                metric_sums[name] = metric_sums.get(name, 0.0) + v.detach().double()
        gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        gnorm = float(gnorm.full_tensor() if hasattr(gnorm, "full_tensor") else gnorm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        tok_window += B * row_tokens
        done = step + 1

        row: dict[str, Any] = {}
        if cfg.due(cfg.log_every, done):  # the global loss: one all-reduce per log step only
            names = sorted(metric_sums)
            sums = all_sum([float(loss_sum), *(float(metric_sums[n]) for n in names)], device, world)
            dt = time.perf_counter() - t_window
            tps = tok_window / dt
            row.update(step=done, **obj.summarize(sums[0] / global_units,
                                                  {n: s / global_units for n, s in zip(names, sums[1:])}))
            row.update(lr=lr, grad_norm=gnorm, tokens_per_s=tps, mfu=mfu(tps / world, flops_tok, peak), epoch=epoch,
                       peak_memory_bytes=peak_memory_bytes(device))
            t_window, tok_window = time.perf_counter(), 0
        if val_rows and cfg.due(cfg.eval_every, done):
            row.update(step=done, **evaluate(model, obj, val_rows, cfg.micro_batch_size, device, world))
        if spec.eval_hook is not None and cfg.due(cfg.eval_every, done):
            row.update(step=done, **spec.eval_hook(model, done))
        if row:
            history.append(row)
            last.update(row)
            if rank == 0:
                write_metrics(spec.out, history)
        if bar is not None:
            if "loss" in last:  # nothing to show before the first measurement
                bar.set_postfix(loss=f"{last['loss']:.3f}", tok_s=f"{last['tokens_per_s']:.0f}", refresh=False)
            bar.update(1)
        if cfg.due(cfg.ckpt_every, done):
            _save_and_report(session, model, opt, done, history, last)
    if bar is not None:
        bar.close()

    _export(spec, model, base, rank)
    if rank == 0:
        write_metrics(spec.out, history)  # also when resumed at the last step (no new rows)
        plot_loss(spec.out, history, title=cfg.name, ylabel=obj.loss_label)


def _maybe_fail(out: str, step: int) -> None:
    marker = join(out, f".injected_failure_{step}")
    if not exists(marker):
        from pipelines.artifacts import write_text

        write_text(marker, "worker killed here by train.inject_failure_at\n")
        log.warning("inject_failure_at=%d: this worker exits now (fault injection)", step)
        os._exit(1)


def _load_val(session: Session, cfg: TrainLoopConfig, rank: int, world: int,
              obj: Objective) -> dict[str, np.ndarray]:
    """This rank's validation rows: the first ``eval_batches x micro_batch_size`` rows of the split (fewer if it is
    smaller), cut into ``world`` equal contiguous parts — the same rows whatever the worker count, and the same
    count on every rank (FSDP needs every rank in every forward)."""
    src = session.val_rows()
    if src is None or cfg.eval_batches <= 0:
        return {}
    wanted = cfg.eval_batches * cfg.micro_batch_size
    total = 0
    for b in src.iter_batches(batch_size=1024, batch_format="numpy"):
        obj.check_columns(set(b), "validation rows")
        total += len(b[obj.required[0]])
        if total >= wanted:
            break
    total = min(total, wanted)
    per_rank = total // world
    if per_rank == 0:
        log.warning("validation split has %d rows (< %d workers): no validation loss", total, world)
        return {}
    return load_rank_rows(src, per_rank * world, rank, per_rank, limit=per_rank * world, objective=obj)


@torch.no_grad()
def evaluate(model: nn.Module, obj: Objective, rows: dict[str, np.ndarray], micro: int, device: torch.device,
             world: int) -> dict[str, float]:
    """The objective's global mean loss and metrics over every rank's validation rows (``val_*`` keys)."""
    model.eval()
    loss_sum, count = 0.0, 0.0
    metric_sums: dict[str, float] = {}
    n = len(rows[obj.required[0]])
    for lo in range(0, n, micro):
        b = tensors(rows, slice(lo, min(n, lo + micro)), device)
        loss, c, metrics = obj(model, b)
        loss_sum += float(loss)
        count += float(c)
        for k, v in metrics.items():
            metric_sums[k] = metric_sums.get(k, 0.0) + float(v)
    names = sorted(metric_sums)
    sums = all_sum([loss_sum, count, *(metric_sums[k] for k in names)], device, world)
    total = max(sums[1], 1.0)
    return obj.summarize(sums[0] / total, {k: s / total for k, s in zip(names, sums[2:])}, prefix="val_")


def _save_and_report(session: Session, model: nn.Module, opt, step: int, history: list, last: dict) -> None:
    """A torch distributed checkpoint (each rank writes its shards) + loop_state.json from rank 0, then report."""
    tmp = tempfile.mkdtemp(prefix=f"genloop-ckpt-{step}-")
    save_train_state(tmp, model, opt, {"step": step, "world": session.world, "history": history}, session.rank)
    metrics = {k: v for k, v in last.items() if isinstance(v, (int, float))}
    metrics["step"] = step
    session.report(metrics, tmp, step)
    shutil.rmtree(tmp, ignore_errors=True)


def _export(spec: TrainSpec, model: nn.Module, base: nn.Module, rank: int) -> None:
    export = spec.export
    if export is None and spec.tokenizer:
        export = hf_export(spec.tokenizer)
    if export is None:
        return
    sd = full_state_dict(model)  # collective under FSDP2: every rank gathers
    if rank == 0:
        export(base, sd, spec.out)

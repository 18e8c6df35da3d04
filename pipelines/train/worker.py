"""The per-worker training loop (Ray Train's ``train_loop_per_worker``, or in-process with a ``LocalSession``), fed a
typed ``TrainSpec``. The loop's contract (data order, loss normalisation, checkpoints) is in
``pipelines/train/loop.py``'s docstring; its rows come from ``pipelines/train/loader.py`` (this rank's rows of each
global batch, read ahead a bounded number of steps)."""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from pipelines.artifacts import join
from pipelines.train.config import TrainLoopConfig
from pipelines.train.loader import RankLoader, val_rows
from pipelines.train.objective import LMObjective, Objective
from pipelines.train.row_store import RowStore
from pipelines.train.schedule import lr_at
from pipelines.train.session import RaySession, Session, fail_once
from pipelines.train.state import build_optimizer, full_state_dict, hf_export, load_train_state, save_train_state

log = logging.getLogger(__name__)

COLUMNS = LMObjective.columns


@dataclass
class TrainSpec:
    """Everything a worker needs (pickled to every Ray Train worker)."""

    cfg: TrainLoopConfig
    build_model: Callable[[], nn.Module]  # runs on every worker: a fresh model or a loaded checkpoint
    out: str  # artifact folder (metrics, export)
    train_store: RowStore  # the run's rows (``pipelines/train/row_store.py``), pickled as path + index
    objective: Objective
    export: Callable[[nn.Module, dict, str], str] | None = None
    eval_hook: Callable[[nn.Module, int], dict] | None = None
    tokenizer: str | None = None  # for the default export (hf_export) when ``export`` is None
    val_store: RowStore | None = None


def peak_memory_bytes(device: torch.device) -> float:
    """This rank's peak memory so far: allocated tensors on a GPU, the process's peak RSS on CPU (what `genloop
    plan` predicts per rank)."""
    if device.type == "cuda":
        return float(torch.cuda.max_memory_allocated(device))
    import resource

    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def tensors(rows: dict[str, np.ndarray], sl: slice, device: torch.device) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v[sl]).to(device) for k, v in rows.items()}


def all_sum(values: list[float], device: torch.device, world: int) -> list[float]:
    """All-reduce SUM (never AVG: gloo's AVG is a SUM, pytorch#162338) of a few floats."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if world > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def worker_device(cfg: Any, threads: int = 0) -> torch.device:
    """This worker's device: its CUDA device when it has one (and ``cfg.use_gpu`` does not turn GPUs off), else the
    CPU with ``threads`` (0: ``cfg.cpus_per_worker``) torch threads. ``cfg``: a ``TrainLoopConfig`` or RLHF's
    ``LearnerConfig``."""
    if torch.cuda.is_available() and cfg.use_gpu is not False:
        return torch.device("cuda", torch.cuda.current_device())
    torch.set_num_threads(threads or cfg.cpus_per_worker)
    return torch.device("cpu")


# ---- the per-worker loop -------------------------------------------------------------------------------------------
def train_worker(config: dict) -> None:
    """Ray Train's ``train_loop_per_worker``: ``config = {"spec": TrainSpec}`` (+ ``"session"`` in process, +
    ``"resume_dir"``: the checkpoint to start from when Ray Train has none, a re-run of a dead job)."""
    spec: TrainSpec = config["spec"]
    session: Session = config.get("session") or RaySession(config.get("resume_dir"))
    run_worker(spec, session)


def run_worker(spec: TrainSpec, session: Session) -> None:
    from models.parallel import autocast, set_gradient_sync, wrap_model
    from pipelines.train.metrics import device_peak_flops, mfu, model_flops_per_token, plot_loss, write_metrics

    cfg, obj = spec.cfg, spec.objective
    rank, world = session.rank, session.world
    device = worker_device(cfg)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)

    B = cfg.global_rows()
    accum = cfg.accum_steps(world)
    A = cfg.micro_batch_size * accum  # this rank's rows per step
    if A * world != B:
        raise ValueError(
            f"the global batch of {B} rows does not split into {world} workers x micro_batch_size "
            f"{cfg.micro_batch_size} x grad_accum {accum}; set train.global_batch_size to a multiple "
            f"of micro_batch_size x workers"
        )
    store = spec.train_store
    if len(store) < B:
        raise ValueError(
            f"the training split has {len(store)} rows, fewer than one global batch ({B} = "
            f"micro_batch_size {cfg.micro_batch_size} x grad_accum {accum} x workers {world}); lower them"
        )
    loader = RankLoader(store, B, rank, world, cfg.seed, cfg.shuffle, obj.dtypes, cfg.prefetch_batches)
    vrows = val_rows(spec.val_store, cfg.eval_batches * cfg.micro_batch_size, rank, world, obj.dtypes)
    probe = {k: v.astype(obj.dtypes.get(k, np.int64)) for k, v in store.read(np.arange(1)).items()}
    store.bytes_read = store.rows_read = 0  # count the training reads only
    seq_len = obj.seq_len(probe)
    row_tokens = obj.row_tokens(probe)

    base = spec.build_model()
    model = wrap_model(
        base,
        cfg.strategy,
        device,
        cfg.activation_checkpointing,
        cfg.compile,
        reshard_after_forward=cfg.fsdp_reshard_after_forward,
    )
    opt = build_optimizer(model, cfg)
    params = [p for p in model.parameters() if p.requires_grad]

    start, history, consumed = 0, [], 0
    ckpt_dir = session.latest_checkpoint()
    if ckpt_dir:
        state = load_train_state(ckpt_dir, model, opt)
        session.release_checkpoint()
        start, history = int(state["step"]), list(state["history"])
        # the one number the data position needs, at any worker count (a checkpoint from before it: step x batch)
        consumed = int(state.get("consumed_samples", start * int(state.get("global_rows", B))))
        log.info(
            "rank %d: resumed from %s at step %d, %d samples consumed (saved by %s workers, now %d)",
            rank,
            ckpt_dir,
            start,
            consumed,
            state.get("world"),
            world,
        )

    flops_tok = model_flops_per_token(base, seq_len)  # genloop plan's count, with this model's own output head
    peak = device_peak_flops(device)
    bar = None
    if rank == 0 and cfg.progress and start < cfg.steps:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, initial=start, desc=cfg.name, mininterval=2.0, dynamic_ncols=True)

    last: dict[str, Any] = dict(history[-1]) if history else {}
    t_window, tok_window = time.perf_counter(), 0
    batches = loader.batches(consumed, max(0, cfg.steps - start))
    wait_window = 0.0  # seconds this window's steps waited for their rows (0 when the read-ahead keeps up)
    for step in range(start, cfg.steps):
        t_wait = time.perf_counter()
        consumed, rows, units = next(batches)
        wait_window += time.perf_counter() - t_wait
        if cfg.inject_failure_at and step == cfg.inject_failure_at and rank == world - 1:
            fail_once(join(spec.out, f".injected_failure_{step}"), "training worker (train.inject_failure_at)")
        epoch = loader.epoch_of(consumed)
        lr = lr_at(step, cfg)
        for group in opt.param_groups:
            group["lr"] = lr
        model.train()
        global_units = max(1.0, units)  # the whole global batch's loss units (every rank computes the same)
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        metric_sums: dict[str, torch.Tensor] = {}
        for k in range(accum):
            b = tensors(rows, slice(k * cfg.micro_batch_size, (k + 1) * cfg.micro_batch_size), device)
            with set_gradient_sync(model, cfg.strategy, k == accum - 1):
                with autocast(cfg.autocast, device):
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
        consumed += B

        row: dict[str, Any] = {}
        if cfg.due(cfg.log_every, done):  # the global loss: one all-reduce per log step only
            names = sorted(metric_sums)
            sums = all_sum([float(loss_sum), *(float(metric_sums[n]) for n in names)], device, world)
            dt = time.perf_counter() - t_window
            tps = tok_window / dt
            row.update(
                step=done,
                **obj.summarize(sums[0] / global_units, {n: s / global_units for n, s in zip(names, sums[1:])}),
            )
            row.update(
                lr=lr,
                grad_norm=gnorm,
                tokens_per_s=tps,
                mfu=mfu(tps / world, flops_tok, peak),
                epoch=epoch,
                consumed_samples=consumed,
                peak_memory_bytes=peak_memory_bytes(device),
                data_bytes_read=loader.bytes_read,
                data_rows_read=loader.rows_read,
                data_wait_frac=wait_window / dt,
            )
            t_window, tok_window, wait_window = time.perf_counter(), 0, 0.0
        if vrows and cfg.due(cfg.eval_every, done):
            row.update(step=done, **evaluate(model, obj, vrows, cfg.micro_batch_size, device, world, cfg.autocast))
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
            _save_and_report(
                session,
                model,
                opt,
                {"step": done, "consumed_samples": consumed, "global_rows": B, "world": world, "history": history},
                last,
            )
    batches.close()
    if bar is not None:
        bar.close()

    _export(spec, model, base, rank)
    if rank == 0:
        write_metrics(spec.out, history)  # also when resumed at the last step (no new rows)
        plot_loss(spec.out, history, title=cfg.name, ylabel=obj.loss_label)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    obj: Objective,
    rows: dict[str, np.ndarray],
    micro: int,
    device: torch.device,
    world: int,
    mode: str = "none",
) -> dict[str, float]:
    """The objective's global mean loss and metrics over every rank's validation rows (``val_*`` keys)."""
    from models.parallel import autocast

    model.eval()
    loss_sum, count = 0.0, 0.0
    metric_sums: dict[str, float] = {}
    n = len(rows[obj.required[0]])
    for lo in range(0, n, micro):
        b = tensors(rows, slice(lo, min(n, lo + micro)), device)
        with autocast(mode, device):
            loss, c, metrics = obj(model, b)
        loss_sum += float(loss)
        count += float(c)
        for k, v in metrics.items():
            metric_sums[k] = metric_sums.get(k, 0.0) + float(v)
    names = sorted(metric_sums)
    sums = all_sum([loss_sum, count, *(metric_sums[k] for k in names)], device, world)
    total = max(sums[1], 1.0)
    return obj.summarize(sums[0] / total, {k: s / total for k, s in zip(names, sums[2:])}, prefix="val_")


def _save_and_report(session: Session, model: nn.Module, opt, state: dict[str, Any], last: dict) -> None:
    """A torch distributed checkpoint (each rank writes its shards) + loop_state.json from rank 0 (``state``: step,
    consumed_samples, global_rows, world, history), then report."""
    step = state["step"]
    tmp = tempfile.mkdtemp(prefix=f"genloop-ckpt-{step}-")
    save_train_state(tmp, model, opt, state, session.rank)
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

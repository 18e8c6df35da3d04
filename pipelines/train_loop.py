"""THE shared training loop (pretraining, domain fine-tuning, SFT) on Ray Train: DDP | FSDP2 | single process.

Interface (stable; SFT calls it)::

    result = fit(cfg: TrainLoopConfig,
                 build_model: Callable[[], Transformer],      # runs on every worker: fresh model or load_checkpoint
                 train_ds: ray.data.Dataset, val_ds: ray.data.Dataset | None,
                 out: str,                                    # artifact folder (local path or s3:// / gs://)
                 export: Callable[[Transformer, dict, str], str] | None = None,
                 eval_hook: Callable[[nn.Module, int], dict] | None = None,
                 tokenizer: str | None = None) -> FitResult

Rows of ``train_ds`` / ``val_ds`` are dicts of equal-length int arrays: ``input_ids`` and ``labels`` (-100 = no
loss), optional ``position_ids`` and ``doc_ids`` (packed samples; both go to ``Transformer.forward``). Every row has
the same length T.

* Loss: token-mean cross-entropy over ``labels != -100`` across the WHOLE global batch (micro-batches x accumulation x
  workers). Each rank sums its token losses; the divisor is the global token count (every global batch's count is
  summed over ranks once, at the start: one all-reduce SUM, none per step), and the loss is multiplied by the world size because DDP/FSDP2 average gradients. So 2 workers == 1 process.
* Data order: with ``shuffle``, the rows are first put in a fixed order that is a seeded permutation of the
  dataset (``row_positions``: consecutive blocks of one document land in different global batches); global batch
  ``g`` is positions ``[g*B, (g+1)*B)`` of that order (B = micro x accum x workers); each epoch visits the global
  batches in an order that is a function of ``seed + epoch``; rank r takes positions ``g*B + r*A + [0, A)`` (A =
  micro x accum). Every rank runs the same number of steps, the order does not depend on the number of workers, and
  a resumed run continues at the checkpoint's step with nothing repeated or skipped. Each worker reads the dataset
  in order (``preserve_order``) and keeps only its own rows in memory (1/workers of the split).
* Only parameters with ``requires_grad`` are optimised (AdamW, fused on CUDA; weight decay on matrices only),
  warmup + cosine to ``min_lr``, clipping, accumulation, fixed seed.
* Checkpoints every ``ckpt_every`` steps and at the end via ``ray.train.report(checkpoint=...)``: a torch distributed
  checkpoint (sharded under FSDP) of model + optimizer + ``loop_state.json`` (step, metric history). Ray Train
  restarts failed workers (``FailureConfig(max_failures)``) from the latest; re-running the same command (same
  ``out``) resumes from the run folder ``<out>/train_runs/<name>``.
* Metrics every ``log_every`` steps (loss, lr, grad_norm, tokens/s, MFU) and every ``eval_every`` (val_loss, val_ppl,
  plus whatever ``eval_hook(model, step)`` returns; it runs on every rank and rank 0's dict is kept) go to
  ``<out>/metrics.jsonl``, ``<out>/metrics.csv`` and ``<out>/loss_curve.png``; tqdm bar on rank 0.
* Export at the end: rank 0 calls ``export(unwrapped_model, full_state_dict, out)`` (default ``hf_export``:
  ``save_checkpoint`` into ``<out>/model`` with ``tokenizer``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from models.transformer import Transformer
from pipelines.artifacts import exists, filesystem, join, read_text

log = logging.getLogger(__name__)

IGNORE = -100
COLUMNS = ("input_ids", "labels", "position_ids", "doc_ids")
LOOP_STATE = "loop_state.json"
MODEL_DIR = "model"
RUNS_DIR = "train_runs"


@dataclass
class TrainLoopConfig:
    """What the loop needs; the global batch is micro_batch_size x grad_accum x num_workers rows."""

    steps: int = 100
    micro_batch_size: int = 8
    grad_accum: int = 1
    lr: float = 3e-4
    min_lr: float = 3e-5
    warmup_steps: int = 10
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    seed: int = 0
    shuffle: bool = True
    log_every: int = 10
    eval_every: int = 50
    eval_batches: int = 8  # validation rows = eval_batches x micro_batch_size (split over workers)
    ckpt_every: int = 100  # 0 = only at the end
    keep_checkpoints: int = 2
    strategy: Literal["ddp", "fsdp", "none"] = "ddp"
    num_workers: int = 1
    use_gpu: bool | None = None  # None = GPUs if the cluster has them
    cpus_per_worker: int = 1  # also the torch threads per worker on CPU
    activation_checkpointing: bool = False
    compile: bool = False
    fsdp_reshard_after_forward: Literal["default", "always", "never"] = "default"  # see models.parallel.wrap_model
    max_failures: int = 0
    name: str = "train"
    progress: bool = True
    inject_failure_at: int = 0  # fault injection for the restart path: the last rank exits once at this step

    def global_rows(self) -> int:
        return self.micro_batch_size * self.grad_accum * self.num_workers

    def validate(self) -> None:
        for key in ("steps", "micro_batch_size", "grad_accum", "num_workers", "cpus_per_worker"):
            if getattr(self, key) < 1:
                raise ValueError(f"train.{key}={getattr(self, key)} must be >= 1")
        if self.strategy == "none" and self.num_workers != 1:
            raise ValueError(f"train.strategy=none runs one process but train.num_workers={self.num_workers}; "
                             "use strategy=ddp or fsdp for several workers")
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"train.min_lr={self.min_lr} must be between 0 and train.lr={self.lr}")


@dataclass
class FitResult:
    out: str
    steps: int
    metrics: dict[str, Any]  # the last logged values (loss, val_loss, val_ppl, tokens_per_s, mfu, ...)
    history: list[dict[str, Any]] = field(default_factory=list)
    model_dir: str | None = None
    checkpoint: str | None = None  # the latest training checkpoint (resume state)


# ---- small pure functions (unit-tested) ----------------------------------------------------------------------------
def lr_at(step: int, cfg: TrainLoopConfig) -> float:
    """Linear warmup over ``warmup_steps`` then cosine from ``lr`` to ``min_lr`` at ``steps`` (step is 0-based)."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


def batch_order(n_batches: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    """The order global batches are visited in one epoch: a function of seed and epoch only."""
    if not shuffle:
        return np.arange(n_batches)
    return np.random.default_rng([seed, epoch]).permutation(n_batches)


def row_positions(n_rows: int, seed: int, shuffle: bool) -> np.ndarray:
    """``pos[i]``: the place of dataset row ``i`` in the loop's fixed row order (a function of seed and n_rows).

    Blocks from the data stage are consecutive pieces of the same documents; a seeded permutation spreads them over
    global batches (nanoGPT samples random offsets for the same reason). Identity without ``shuffle``."""
    if not shuffle:
        return np.arange(n_rows)
    perm = np.random.default_rng([seed, n_rows]).permutation(n_rows)  # perm[p] = the row at place p
    pos = np.empty(n_rows, dtype=np.int64)
    pos[perm] = np.arange(n_rows)
    return pos


def rank_row_mask(n_rows: int, global_rows: int, rank: int, rows_per_rank: int,
                  positions: np.ndarray | None = None) -> np.ndarray:
    """Which dataset rows rank ``rank`` keeps: places ``g*B + rank*A + [0, A)`` of every complete global batch g
    (place = ``positions[row]``, default the row index itself)."""
    pos = np.arange(n_rows) if positions is None else positions[:n_rows]
    within = pos % global_rows
    return (pos < (len(pos) // global_rows) * global_rows) & (within >= rank * rows_per_rank) & (
        within < (rank + 1) * rows_per_rank)


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of token cross-entropies, number of counted tokens) over ``labels != -100``; logits (B, T, V)."""
    loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE, reduction="sum")
    return loss, (labels != IGNORE).sum()


def hf_export(tokenizer: str) -> Callable[[Transformer, dict, str], str]:
    """The default export: a Hugging Face folder ``<out>/model`` (``save_checkpoint``) with the given tokenizer."""

    def export(model: Transformer, state_dict: dict, out: str) -> str:
        from models.checkpoint import save_checkpoint
        from models.tokenizer import Tokenizer

        tok = Tokenizer.load(tokenizer)
        target = join(out, MODEL_DIR)
        with _local_dir(target) as local:
            save_checkpoint(model, tok, local, state_dict=state_dict)
        return target

    return export


class _local_dir:
    """A local folder for ``uri``: the path itself when local, else a temp dir uploaded on exit."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.tmp = tempfile.mkdtemp() if "://" in uri else None

    def __enter__(self) -> str:
        return self.tmp or self.uri

    def __exit__(self, *exc) -> None:
        if self.tmp:
            import pyarrow.fs as pafs

            if exc[0] is None:
                fs, path = filesystem(self.uri)
                pafs.copy_files(self.tmp, path, destination_filesystem=fs)
            shutil.rmtree(self.tmp, ignore_errors=True)


# ---- the session: Ray Train or this process --------------------------------------------------------------------------
class _Session:
    """What the worker loop needs from its runner: rank/world, datasets, checkpoints, report."""

    rank = 0
    world = 1

    def train_rows(self) -> Any: ...
    def val_rows(self) -> Any: ...
    def latest_checkpoint(self) -> str | None: ...
    def report(self, metrics: dict, ckpt_dir: str | None, step: int) -> None: ...


class _RaySession(_Session):
    def __init__(self, has_val: bool, resume_dir: str | None = None) -> None:
        import ray.train

        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self._train = ray.train
        self.has_val = has_val
        self.resume_dir = resume_dir

    def train_rows(self):
        return self._train.get_dataset_shard("train")

    def val_rows(self):
        return self._train.get_dataset_shard("val") if self.has_val else None

    def latest_checkpoint(self):
        ckpt = self._train.get_checkpoint()
        if ckpt is None:
            return self.resume_dir
        # storage is a local or mounted path here (a cloud URI is downloaded by as_directory)
        self._ckpt_ctx = ckpt.as_directory()
        return self._ckpt_ctx.__enter__()

    def report(self, metrics, ckpt_dir, step):
        from ray.train import Checkpoint

        ckpt = Checkpoint.from_directory(ckpt_dir) if ckpt_dir else None
        self._train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=f"step_{step:08d}" if ckpt else None)


class _LocalSession(_Session):
    """In-process run (strategy none, one worker): the reference the distributed runs are checked against."""

    def __init__(self, train_ds, val_ds, run_dir: str) -> None:
        self._train, self._val, self.run_dir = train_ds, val_ds, run_dir

    def train_rows(self):
        return _ordered(self._train)

    def val_rows(self):
        return _ordered(self._val) if self._val is not None else None

    def latest_checkpoint(self):
        return latest_checkpoint_dir(self.run_dir)

    def report(self, metrics, ckpt_dir, step):
        if ckpt_dir:
            target = os.path.join(self.run_dir, f"step_{step:08d}")
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(ckpt_dir, target)


def _ordered(ds):
    """Ray Data may reorder blocks unless told otherwise; the loop's data order must be deterministic."""
    from ray.data import DataContext

    DataContext.get_current().execution_options.preserve_order = True
    return ds


def latest_checkpoint_dir(run_dir: str) -> str | None:
    """The newest complete ``step_*`` checkpoint under a run folder (complete = has loop_state.json)."""
    if not os.path.isdir(run_dir):
        return None
    done = sorted(d for d in os.listdir(run_dir) if d.startswith("step_")
                  and os.path.exists(os.path.join(run_dir, d, LOOP_STATE)))
    return os.path.join(run_dir, done[-1]) if done else None


# ---- data on a worker ----------------------------------------------------------------------------------------------
def load_rank_rows(source: Any, global_rows: int, rank: int, rows_per_rank: int,
                   limit: int | None = None, positions: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Read ``source`` (Dataset or DataIterator) in order, keeping this rank's rows in the order of their places
    (``positions``, see ``row_positions``; without them: the first ``limit`` rows in dataset order):
    {column: (N_rank, T) int64}."""
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
        cols = {k: _stack(v) for k, v in batch.items() if k in COLUMNS}
        n = len(cols["input_ids"])
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
    return {k: np.concatenate(v).astype(np.int64)[order] for k, v in kept.items()}


def _stack(col: np.ndarray) -> np.ndarray:
    if col.dtype == object:
        lengths = {len(x) for x in col}
        if len(lengths) > 1:
            raise ValueError(f"training rows must all have the same length; got lengths {sorted(lengths)[:5]}")
        return np.stack(col)
    return col


def _tensors(rows: dict[str, np.ndarray], sl: slice, device: torch.device) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v[sl]).to(device) for k, v in rows.items()}


def _forward(model: nn.Module, b: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(b["input_ids"], position_ids=b.get("position_ids"), doc_ids=b.get("doc_ids"))


def _all_sum(values: list[float], device: torch.device, world: int) -> list[float]:
    """All-reduce SUM (never AVG: gloo's AVG is a SUM, pytorch#162338) of a few floats."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if world > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


# ---- the per-worker loop -------------------------------------------------------------------------------------------
def train_worker(args: dict) -> None:
    """Ray Train's ``train_loop_per_worker`` (also called in-process with a ``_LocalSession``)."""
    cfg: TrainLoopConfig = args["cfg"]
    session: _Session = args.get("session") or _RaySession(args.get("has_val", False), args.get("resume_dir"))
    rank, world = session.rank, session.world
    from models.parallel import set_gradient_sync, wrap_model
    from pipelines.metrics import device_peak_flops, mfu, plot_loss, write_metrics

    if torch.cuda.is_available() and cfg.use_gpu is not False:
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
        torch.set_num_threads(cfg.cpus_per_worker)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False  # the loop has its own bar

    A = cfg.micro_batch_size * cfg.grad_accum
    B = A * world
    positions = row_positions(args["n_train_rows"], cfg.seed, cfg.shuffle)
    rows = load_rank_rows(session.train_rows(), B, rank, A, positions=positions)
    n_batches = len(rows.get("input_ids", ())) // A
    if n_batches == 0:
        raise ValueError(f"the training split has fewer rows than one global batch ({B} = micro_batch_size "
                         f"{cfg.micro_batch_size} x grad_accum {cfg.grad_accum} x workers {world}); lower them")
    val_rows = _load_val(session, cfg, rank, world)
    seq_len = rows["input_ids"].shape[1]
    # counted tokens of every global batch, summed over ranks once here instead of a blocking all-reduce per step
    local_counts = (rows["labels"][:n_batches * A] != IGNORE).reshape(n_batches, -1).sum(axis=1)  # (n_batches,)
    batch_tokens = _all_sum(local_counts.tolist(), device, world)

    model = args["build_model"]()
    base: Transformer = model
    model = wrap_model(model, cfg.strategy, device, cfg.activation_checkpointing, cfg.compile,
                       reshard_after_forward=cfg.fsdp_reshard_after_forward)
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=cfg.lr, betas=tuple(cfg.betas), fused=device.type == "cuda")

    start, history = 0, []
    ckpt_dir = session.latest_checkpoint()
    if ckpt_dir:
        start, history = _load_checkpoint(ckpt_dir, model, opt)
        log.info("rank %d: resumed from %s at step %d", rank, ckpt_dir, start)

    flops_tok = base.cfg.flops_per_token(seq_len)
    peak = device_peak_flops(device)
    bar = None
    if rank == 0 and cfg.progress and start < cfg.steps:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, initial=start, desc=cfg.name, mininterval=2.0, dynamic_ncols=True)

    last: dict[str, Any] = dict(history[-1]) if history else {}
    t_window, tok_window = time.perf_counter(), 0
    for step in range(start, cfg.steps):
        if cfg.inject_failure_at and step == cfg.inject_failure_at and rank == world - 1:
            _maybe_fail(args["out"], step)
        epoch, j = divmod(step, n_batches)
        g = int(batch_order(n_batches, cfg.seed, epoch, cfg.shuffle)[j])
        lr = lr_at(step, cfg)
        for group in opt.param_groups:
            group["lr"] = lr
        model.train()
        global_tokens = max(1.0, batch_tokens[g])
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        for k in range(cfg.grad_accum):
            lo = g * A + k * cfg.micro_batch_size
            b = _tensors(rows, slice(lo, lo + cfg.micro_batch_size), device)
            last_micro = k == cfg.grad_accum - 1
            with set_gradient_sync(model, cfg.strategy, last_micro):
                ce, _ = token_loss_sum(_forward(model, b), b["labels"])
                (ce * (world / global_tokens)).backward()
            loss_sum += ce.detach().double()
        gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        gnorm = float(gnorm.full_tensor() if hasattr(gnorm, "full_tensor") else gnorm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        tok_window += B * seq_len
        done = step + 1

        row: dict[str, Any] = {}
        if done % cfg.log_every == 0 or done == cfg.steps:  # the global loss: one all-reduce per log step only
            loss = _all_sum([float(loss_sum)], device, world)[0] / global_tokens
            dt = time.perf_counter() - t_window
            tps = tok_window / dt
            row.update(step=done, loss=loss, lr=lr, grad_norm=gnorm, tokens_per_s=tps,
                       mfu=mfu(tps / world, flops_tok, peak), epoch=epoch)
            t_window, tok_window = time.perf_counter(), 0
        if val_rows and (done % cfg.eval_every == 0 or done == cfg.steps):
            row.update(step=done, **_evaluate(model, val_rows, cfg.micro_batch_size, device, world))
        if args.get("eval_hook") and (done % cfg.eval_every == 0 or done == cfg.steps):
            row.update(step=done, **args["eval_hook"](model, done))
        if row:
            history.append(row)
            last.update(row)
            if rank == 0:
                write_metrics(args["out"], history)
        if bar is not None:
            bar.set_postfix(loss=f"{last.get('loss', float('nan')):.3f}", tok_s=f"{last.get('tokens_per_s', 0):.0f}", refresh=False)
            bar.update(1)
        if (cfg.ckpt_every and done % cfg.ckpt_every == 0) or done == cfg.steps:
            _save_and_report(session, model, opt, done, history, last)
    if bar is not None:
        bar.close()

    _export(args, model, base, rank)
    if rank == 0:
        write_metrics(args["out"], history)  # also when resumed at the last step (no new rows)
        plot_loss(args["out"], history, title=cfg.name)


def _maybe_fail(out: str, step: int) -> None:
    marker = join(out, f".injected_failure_{step}")
    if not exists(marker):
        from pipelines.artifacts import write_text

        write_text(marker, "worker killed here by train.inject_failure_at\n")
        log.warning("inject_failure_at=%d: this worker exits now (fault injection)", step)
        os._exit(1)


def _load_val(session: _Session, cfg: TrainLoopConfig, rank: int, world: int) -> dict[str, np.ndarray]:
    """This rank's validation rows: the first ``eval_batches x micro_batch_size`` rows of the split (fewer if it is
    smaller), cut into ``world`` equal contiguous parts — the same rows whatever the worker count, and the same
    count on every rank (FSDP needs every rank in every forward)."""
    src = session.val_rows()
    if src is None or cfg.eval_batches <= 0:
        return {}
    wanted = cfg.eval_batches * cfg.micro_batch_size
    total = 0
    for b in src.iter_batches(batch_size=1024, batch_format="numpy"):
        total += len(b["input_ids"])
        if total >= wanted:
            break
    total = min(total, wanted)
    per_rank = total // world
    if per_rank == 0:
        log.warning("validation split has %d rows (< %d workers): no validation loss", total, world)
        return {}
    return load_rank_rows(src, per_rank * world, rank, per_rank, limit=per_rank * world)


@torch.no_grad()
def _evaluate(model: nn.Module, rows: dict[str, np.ndarray], micro: int, device: torch.device,
              world: int) -> dict[str, float]:
    model.eval()
    loss_sum, count = 0.0, 0.0
    n = len(rows["input_ids"])
    for lo in range(0, n, micro):
        b = _tensors(rows, slice(lo, min(n, lo + micro)), device)
        ce, c = token_loss_sum(_forward(model, b), b["labels"])
        loss_sum += float(ce)
        count += float(c)
    loss_sum, count = _all_sum([loss_sum, count], device, world)
    val = loss_sum / max(count, 1.0)
    return {"val_loss": val, "val_ppl": math.exp(min(val, 50.0))}


def _save_and_report(session: _Session, model: nn.Module, opt, step: int, history: list, last: dict) -> None:
    """A torch distributed checkpoint (each rank writes its shards) + loop_state.json from rank 0, then report."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    tmp = tempfile.mkdtemp(prefix=f"genloop-ckpt-{step}-")
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
    dcp.save(state, checkpoint_id=tmp)
    if session.rank == 0:
        Path(tmp, LOOP_STATE).write_text(json.dumps({"step": step, "world": session.world, "history": history}))
    metrics = {k: v for k, v in last.items() if isinstance(v, (int, float))}
    metrics["step"] = step
    session.report(metrics, tmp, step)
    shutil.rmtree(tmp, ignore_errors=True)


def _load_checkpoint(ckpt_dir: str, model: nn.Module, opt) -> tuple[int, list]:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)

    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
    dcp.load(state, checkpoint_id=ckpt_dir)
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, opt, state["optim"])
    meta = json.loads(Path(ckpt_dir, LOOP_STATE).read_text())
    return int(meta["step"]), list(meta["history"])


def _export(args: dict, model: nn.Module, base: Transformer, rank: int) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    export = args.get("export")
    if export is None and args.get("tokenizer"):
        export = hf_export(args["tokenizer"])
    if export is None:
        return
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        export(base, sd, args["out"])


# ---- the driver ----------------------------------------------------------------------------------------------------
def fit(cfg: TrainLoopConfig, build_model: Callable[[], Transformer], train_ds, val_ds, out: str,
        export: Callable[[Transformer, dict, str], str] | None = None,
        eval_hook: Callable[[nn.Module, int], dict] | None = None, tokenizer: str | None = None,
        in_process: bool = False) -> FitResult:
    """Train ``build_model()`` on ``train_ds`` and return the final metrics (see the module docstring).

    ``in_process=True`` (strategy none, one worker) runs the loop in this process without Ray Train — the
    single-process reference; otherwise a ``TorchTrainer`` runs ``num_workers`` workers.
    """
    cfg.validate()
    run_dir = join(out, RUNS_DIR)
    args = {"cfg": cfg, "build_model": build_model, "out": out, "export": export, "eval_hook": eval_hook,
            "tokenizer": tokenizer, "n_train_rows": train_ds.count()}
    if in_process:
        if cfg.num_workers != 1 or cfg.strategy != "none":
            raise ValueError("in_process=True runs one process: set train.num_workers=1 and train.strategy=none")
        local_run = os.path.join(run_dir, cfg.name)
        os.makedirs(local_run, exist_ok=True)
        train_worker({**args, "session": _LocalSession(train_ds, val_ds, local_run)})
        ckpt = latest_checkpoint_dir(local_run)
    else:
        ckpt = _fit_ray(cfg, args, train_ds, val_ds, run_dir)
    history = _read_history(out)
    last: dict[str, Any] = {}
    for r in history:
        last.update(r)
    model_dir = join(out, MODEL_DIR) if exists(join(out, MODEL_DIR, "config.json")) else None
    return FitResult(out=out, steps=int(last.get("step", 0)), metrics=last, history=history, model_dir=model_dir,
                     checkpoint=ckpt)


def check_placement(cfg: TrainLoopConfig, use_gpu: bool) -> None:
    """Fail up front when the cluster cannot place ``num_workers`` workers (instead of waiting forever)."""
    import ray

    res = ray.cluster_resources()
    need_cpu = cfg.num_workers * cfg.cpus_per_worker
    if res.get("CPU", 0) < need_cpu:
        raise ValueError(f"train.num_workers={cfg.num_workers} x cpus_per_worker={cfg.cpus_per_worker} needs "
                         f"{need_cpu} CPUs but the Ray cluster has {res.get('CPU', 0):g}; lower --num-workers")
    if use_gpu and res.get("GPU", 0) < cfg.num_workers:
        raise ValueError(f"train.num_workers={cfg.num_workers} GPU workers but the Ray cluster has "
                         f"{res.get('GPU', 0):g} GPUs; lower --num-workers or drop --use-gpu")


def _fit_ray(cfg: TrainLoopConfig, args: dict, train_ds, val_ds, run_dir: str) -> str | None:
    from ray.data import ExecutionOptions
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipelines.runtime import use_gpu_default

    use_gpu = use_gpu_default() if cfg.use_gpu is None else cfg.use_gpu
    check_placement(cfg, use_gpu)
    datasets = {"train": train_ds}
    if val_ds is not None:
        datasets["val"] = val_ds
    args = {**args, "has_val": val_ds is not None}
    resources = {"CPU": cfg.cpus_per_worker}
    if "://" not in run_dir and (latest := latest_checkpoint_dir(os.path.join(run_dir, cfg.name))):
        # a re-run after the whole job died: workers start from here unless Ray Train hands them a newer one
        log.info("resuming from %s (re-run of %s)", latest, cfg.name)
        args = {**args, "resume_dir": latest}
    from ray.data import DataContext

    # the workers' reads would each draw bars for minutes; the loop has its own. A dataset carries the context it was
    # made under (to the workers too), so its own context is switched as well as the current one
    contexts = [DataContext.get_current(), *(d.context for d in datasets.values())]
    bars = [c.enable_progress_bars for c in contexts]
    for c in contexts:
        c.enable_progress_bars = False
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={**args, "cfg": cfg},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RunConfig(name=cfg.name, storage_path=_storage_path(run_dir),
                             failure_config=FailureConfig(max_failures=cfg.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=max(1, cfg.keep_checkpoints))),
        datasets=datasets,
        # every worker reads the whole split in order and keeps its own rows (see the module docstring)
        dataset_config=DataConfig(datasets_to_split=[], execution_options=ExecutionOptions(preserve_order=True)),
    )
    try:
        result = trainer.fit()
    finally:
        for c, b in zip(contexts, bars):
            c.enable_progress_bars = b
    if result.error:
        raise result.error
    return result.checkpoint.path if result.checkpoint else None


def _storage_path(run_dir: str) -> str:
    if "://" in run_dir:
        return run_dir
    os.makedirs(run_dir, exist_ok=True)
    return str(Path(run_dir).resolve())


def _read_history(out: str) -> list[dict[str, Any]]:
    path = join(out, "metrics.jsonl")
    if not exists(path):
        return []
    return [json.loads(line) for line in read_text(path).splitlines() if line.strip()]


def config_dict(cfg: TrainLoopConfig) -> dict[str, Any]:
    return asdict(cfg)

"""The training loop's typed config and result (``pipelines/train/loop.py`` has the whole story)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

LOOP_STATE = "loop_state.json"  # written beside every training checkpoint: step, world size, metric history
MODEL_DIR = "model"  # <out>/model: the exported Hugging Face folder
RUNS_DIR = "train_runs"  # <out>/train_runs/<name>: Ray Train's run folder (checkpoints, resume)


@dataclass
class TrainLoopConfig:
    """What the loop needs; the global batch is micro_batch_size x grad_accum x num_workers rows, or
    ``global_batch_size`` rows when set (then grad_accum follows from it: global / (micro x workers), so a run resumed
    at another worker count trains on the same global batches).

    ``log_every`` / ``eval_every`` / ``ckpt_every``: 0 = no periodic logging / evaluation / checkpoints; the last step
    still logs, evaluates (when there is a validation split and ``eval_batches > 0``) and checkpoints, because the
    final numbers are what a stage reports and the last checkpoint is the resume point."""

    steps: int = 100
    micro_batch_size: int = 8
    grad_accum: int = 1
    global_batch_size: int = 0  # rows per optimizer step; 0 = micro_batch_size x grad_accum x num_workers
    lr: float = 3e-4
    min_lr: float = 3e-5
    warmup_steps: int = 10
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    seed: int = 0
    shuffle: bool = True
    prefetch_batches: int = 2  # global batches each worker reads ahead (bounded read-ahead; 0 = on demand)
    log_every: int = 10  # 0 = only the last step
    eval_every: int = 50  # 0 = only the last step
    eval_batches: int = 8  # validation rows = eval_batches x micro_batch_size (split over workers); 0 = no validation
    ckpt_every: int = 100  # 0 = only at the end
    keep_checkpoints: int = 2
    strategy: Literal["ddp", "fsdp", "none"] = "ddp"
    num_workers: int = 1
    use_gpu: bool | None = None  # None = GPUs if the cluster has them
    cpus_per_worker: int = 1  # also the torch threads per worker on CPU
    activation_checkpointing: bool = False
    compile: bool = False
    autocast: Literal["none", "bf16"] = "none"  # bf16: bfloat16 autocast forward (models.parallel.autocast)
    fsdp_reshard_after_forward: Literal["default", "always", "never"] = "default"  # see models.parallel.wrap_model
    max_failures: int = 0
    name: str = "train"
    progress: bool = True
    inject_failure_at: int = 0  # fault injection for the restart path: the last rank exits once at this step

    def global_rows(self) -> int:
        return self.global_batch_size or self.micro_batch_size * self.grad_accum * self.num_workers

    def accum_steps(self, world: int) -> int:
        """Micro-batches per rank per step at ``world`` workers."""
        if not self.global_batch_size:
            return self.grad_accum
        per = self.micro_batch_size * world
        if self.global_batch_size % per:
            raise ValueError(
                f"train.global_batch_size={self.global_batch_size} is not a multiple of "
                f"micro_batch_size {self.micro_batch_size} x {world} workers; pick a multiple of {per}"
            )
        return self.global_batch_size // per

    def validate(self) -> None:
        for key in ("steps", "micro_batch_size", "grad_accum", "num_workers", "cpus_per_worker"):
            if getattr(self, key) < 1:
                raise ValueError(f"train.{key}={getattr(self, key)} must be >= 1")
        for key in (
            "log_every",
            "eval_every",
            "ckpt_every",
            "eval_batches",
            "warmup_steps",
            "max_failures",
            "inject_failure_at",
            "global_batch_size",
            "prefetch_batches",
        ):
            if getattr(self, key) < 0:
                raise ValueError(f"train.{key}={getattr(self, key)} must be >= 0 (0 = never / only at the end)")
        if self.keep_checkpoints < 1:
            raise ValueError(f"train.keep_checkpoints={self.keep_checkpoints} must be >= 1 (the resume point)")
        if self.autocast not in ("none", "bf16"):
            raise ValueError(f"train.autocast={self.autocast!r}: use none or bf16")
        if self.strategy not in ("ddp", "fsdp", "none"):
            raise ValueError(f"train.strategy={self.strategy!r}: use ddp, fsdp or none")
        if self.strategy == "none" and self.num_workers != 1:
            raise ValueError(
                f"train.strategy=none runs one process but train.num_workers={self.num_workers}; "
                "use strategy=ddp or fsdp for several workers"
            )
        self.accum_steps(self.num_workers)  # global_batch_size must split into micro-batches on every worker
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"train.min_lr={self.min_lr} must be between 0 and train.lr={self.lr}")

    def due(self, every: int, done: int) -> bool:
        """Is step ``done`` (1-based) a log/eval/checkpoint step for period ``every`` (0 = only the last step)?"""
        return done == self.steps or (every > 0 and done % every == 0)


@dataclass
class FitResult:
    out: str
    steps: int
    metrics: dict[str, Any]  # the last logged values (loss, val_loss, val_ppl, tokens_per_s, mfu, ...)
    history: list[dict[str, Any]] = field(default_factory=list)
    model_dir: str | None = None
    checkpoint: str | None = None  # the latest training checkpoint (resume state)

    def final_metrics(self) -> dict[str, float]:
        """The last logged numbers as ``final_<name>`` (step left out): what a stage's manifest records of the
        loop beside its own held-out numbers."""
        return {f"final_{k}": v for k, v in self.metrics.items() if isinstance(v, (int, float)) and k != "step"}

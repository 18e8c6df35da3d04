"""The training loop's learning-rate schedule: a function of the step and the config only, so every worker computes
the same value without talking. (The sample order is ``pipelines/train/loader.py``'s.)"""

from __future__ import annotations

import math

from pipelines.train.config import TrainLoopConfig


def lr_at(step: int, cfg: TrainLoopConfig) -> float:
    """Linear warmup over ``warmup_steps`` then cosine from ``lr`` to ``min_lr`` at ``steps`` (step is 0-based)."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))

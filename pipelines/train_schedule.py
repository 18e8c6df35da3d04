"""Pure order and schedule functions of the training loop: learning rate, global-batch order, which rows a rank
keeps. Functions of their arguments only (seed, counts), so every worker computes the same answer without talking."""

from __future__ import annotations

import math

import numpy as np

from pipelines.train_config import TrainLoopConfig


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

"""What the training loop minimises: an objective ``(model, batch) -> (loss_sum, count, metric_sums)``.

The shape is torchtitan's: an objective returns the SUM of its per-unit losses over the micro-batch and the number of
units (tokens for language modelling, pairs for preference losses); the loop divides by the global unit count of the
whole global batch (all micro-batches, all ranks), so the loss does not depend on the worker count. ``metric_sums``
are sums too (e.g. correctly ordered pairs), divided by the same global count when logged.

An objective also says which row columns it reads (``columns``; the loop keeps only those, ``required`` must be
present), how many units each row holds (``row_counts``, stored with the rows by the loader, so every rank knows each
global batch's divisor without talking), and how many tokens a row puts through the model (throughput, MFU).

``LMObjective`` (the default): token-mean cross-entropy over ``labels != IGNORE``. The preference objectives
(Bradley-Terry for the reward model, DPO) live in ``pipelines/prefs/objectives.py``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

IGNORE = -100  # the one "no loss here" label index


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of token cross-entropies, number of counted tokens) over ``labels != -100``; logits (B, T, V)."""
    loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE, reduction="sum")
    return loss, (labels != IGNORE).sum()


def lm_forward(model: nn.Module, b: dict[str, torch.Tensor]) -> torch.Tensor:
    """The model on a batch of LM rows: (B, T, V) logits (or (B, T) scores for a scalar model)."""
    return model(b["input_ids"], position_ids=b.get("position_ids"), doc_ids=b.get("doc_ids"))


class Objective:
    """The loss interface of the loop (see the module docstring). Subclasses set ``columns``/``required`` and
    implement ``__call__``, ``row_counts`` and ``row_tokens``."""

    name = "objective"
    loss_label = "loss"  # the y axis of loss_curve.png
    columns: tuple[str, ...] = ()
    required: tuple[str, ...] = ()
    dtypes: dict[str, Any] = {}  # column -> numpy dtype on the worker (default int64)

    def __call__(
        self, model: nn.Module, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def row_counts(self, rows: dict[str, np.ndarray]) -> np.ndarray:
        """(N,) loss units in each row."""
        raise NotImplementedError

    def row_tokens(self, rows: dict[str, np.ndarray]) -> int:
        """Tokens one row puts through the model (forward + backward), for tokens/s."""
        raise NotImplementedError

    def seq_len(self, rows: dict[str, np.ndarray]) -> int:
        """The sequence length of a forward (for the FLOPs per token)."""
        return int(rows[self.required[0]].shape[1])

    def summarize(self, loss: float, means: dict[str, float], prefix: str = "") -> dict[str, float]:
        """A metrics row from the global mean loss and metric means; ``prefix`` is ``val_`` for validation."""
        return {f"{prefix}loss": loss, **{f"{prefix}{k}": v for k, v in means.items()}}

    def check_columns(self, present: set[str], where: str) -> None:
        missing = [c for c in self.required if c not in present]
        if missing:
            raise ValueError(
                f"{where}: the {self.name} objective needs row columns {list(self.required)} but "
                f"{missing} are missing (got {sorted(present)})"
            )


class LMObjective(Objective):
    """Token-mean cross-entropy over ``labels != IGNORE`` (pretraining, SFT). Validation adds perplexity."""

    name = "lm"
    loss_label = "cross-entropy (nats/token)"
    columns = ("input_ids", "labels", "position_ids", "doc_ids")
    required = ("input_ids", "labels")

    def __call__(self, model, batch):
        loss, count = token_loss_sum(lm_forward(model, batch), batch["labels"])
        return loss, count, {}

    def row_counts(self, rows):
        return (rows["labels"] != IGNORE).sum(axis=1)

    def row_tokens(self, rows):
        return int(rows["input_ids"].shape[1])

    def summarize(self, loss, means, prefix=""):
        row = super().summarize(loss, means, prefix)
        if prefix:
            row[f"{prefix}ppl"] = math.exp(min(loss, 50.0))
        return row

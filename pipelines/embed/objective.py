"""The training loop's objectives for a bi-encoder: in-batch-negative InfoNCE over (query, document) pair rows.

``TokenInfoNCEObjective`` (a transformer checkpoint): rows ``q_ids`` / ``d_ids`` (L,) token ids right-padded and
``q_len`` / ``d_len`` () the real tokens' counts (``pad_tokens`` makes them); the model is ``models.transformer.
Transformer``, a side's vector its final normed hidden states mean-pooled over the real tokens (``models.pooling``,
what ``/v1/embeddings`` and the ``ckpt:`` embedder compute).

``InfoNCEObjective`` (the LSA bag of terms): rows (``pad_bags`` makes them): ``q_ids`` / ``d_ids`` (L,) term ids and ``q_w`` / ``d_w`` (L,) their weights, padded
with id 0 and weight 0 (a zero weight adds nothing to the bag). One loss unit per pair. The negatives of a pair are
the other pairs of its micro-batch on its worker (as sentence-transformers does per device), so ``micro_batch_size``
is the number of candidates each query is trained against.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from models.pooling import embed_hidden
from pipelines.embed.loss import SCALE, info_nce
from pipelines.train.objective import Objective


def pad_bags(rows: list[dict[int, float]], width: int) -> tuple[np.ndarray, np.ndarray]:
    """(N, width) ids and weights; a bag with more terms keeps its ``width`` heaviest."""
    ids = np.zeros((len(rows), width), np.int64)
    w = np.zeros((len(rows), width), np.float32)
    for i, r in enumerate(rows):
        top = sorted(r.items(), key=lambda kv: -kv[1])[:width]
        if top:
            ids[i, : len(top)] = [t for t, _ in top]
            w[i, : len(top)] = [v for _, v in top]
    return ids, w


def info_nce_step(a: torch.Tensor, p: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """An objective's return for (B, D) query and document vectors: the InfoNCE loss, its unit count (pairs) and the
    in-batch top-1 accuracy (summed)."""
    loss, n = info_nce(a, p, scale)
    with torch.no_grad():
        right = (a @ p.T).argmax(1) == torch.arange(len(a), device=a.device)
    return loss, torch.tensor(float(n), device=a.device), {"accuracy": right.float().sum()}


class BagEncoder(nn.Module):
    """``embed = normalise(sum_t w_t E[t])``: an embedding bag over weighted term ids, shared by both sides."""

    def __init__(self, init: torch.Tensor) -> None:
        super().__init__()
        self.bag = nn.EmbeddingBag(init.shape[0], init.shape[1], mode="sum")
        with torch.no_grad():
            self.bag.weight.copy_(init.float())

    def forward(self, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.bag(ids, per_sample_weights=weights.float()), dim=-1)


class InfoNCEObjective(Objective):
    name = "infonce"
    loss_label = "InfoNCE (nats/pair)"
    columns = ("q_ids", "q_w", "d_ids", "d_w")
    required = columns
    dtypes = {"q_w": np.float32, "d_w": np.float32}

    def __init__(self, scale: float = SCALE) -> None:
        self.scale = scale

    def __call__(self, model, batch):
        return info_nce_step(model(batch["q_ids"], batch["q_w"]), model(batch["d_ids"], batch["d_w"]), self.scale)

    def row_counts(self, rows):
        return np.ones(len(rows["q_ids"]), np.int64)

    def row_tokens(self, rows):
        return int(rows["q_ids"].shape[1] + rows["d_ids"].shape[1])


def pad_tokens(rows: list[list[int]], width: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(N, width) token ids right-padded with ``pad_id`` (a longer row keeps its first ``width``) and (N,) lengths;
    an empty row becomes one pad token (a vector needs a token to pool)."""
    ids = np.full((len(rows), width), pad_id, np.int64)
    lens = np.ones(len(rows), np.int64)
    for i, r in enumerate(rows):
        r = r[:width]
        if r:
            ids[i, : len(r)] = r
            lens[i] = len(r)
    return ids, lens


def encode_tokens(model: nn.Module, ids: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
    """(B, D) unit vectors: (B, L) right-padded ids, (B,) lengths; the batch is cut to its longest row first."""
    T = int(lens.max())
    mask = (torch.arange(T, device=ids.device)[None, :] < lens[:, None]).float()  # (B, T)
    return embed_hidden(model, ids[:, :T], mask, "mean")


class TokenInfoNCEObjective(Objective):
    """In-batch-negative InfoNCE for a transformer bi-encoder (mean pooling); one loss unit per pair."""

    name = "infonce"
    loss_label = "InfoNCE (nats/pair)"
    columns = ("q_ids", "q_len", "d_ids", "d_len")
    required = columns

    def __init__(self, scale: float = SCALE) -> None:
        self.scale = scale

    def __call__(self, model, batch):
        a = encode_tokens(model, batch["q_ids"], batch["q_len"])
        return info_nce_step(a, encode_tokens(model, batch["d_ids"], batch["d_len"]), self.scale)

    def row_counts(self, rows):
        return np.ones(len(rows["q_ids"]), np.int64)

    def row_tokens(self, rows):
        return int(rows["q_len"].sum() + rows["d_len"].sum()) // max(1, len(rows["q_len"]))

"""The contrastive loss of a bi-encoder: in-batch negatives InfoNCE (sentence-transformers'
MultipleNegativesRankingLoss): cosine similarity of every anchor with every positive, times ``scale`` (20),
cross-entropy against the diagonal (anchor i's positive is positive i; the other positives of the batch are its
negatives). Bigger batches give more negatives."""

from __future__ import annotations

import torch
import torch.nn.functional as F

SCALE = 20.0


def info_nce(anchors: torch.Tensor, positives: torch.Tensor, scale: float = SCALE) -> tuple[torch.Tensor, int]:
    """``(sum over anchors of -log softmax_j(scale * cos(a_i, p_j))[i], number of anchors)``: (B, D), (B, D).
    A sum and a count, as the training loop's objectives return, so the mean is ``sum / count``."""
    if anchors.shape != positives.shape or anchors.ndim != 2:
        raise ValueError(f"anchors {tuple(anchors.shape)} and positives {tuple(positives.shape)} must both be (B, D)")
    sim = F.normalize(anchors, dim=-1) @ F.normalize(positives, dim=-1).T * scale
    target = torch.arange(len(anchors), device=anchors.device)
    return F.cross_entropy(sim, target, reduction="sum"), len(anchors)


def recall_at(anchors: torch.Tensor, candidates: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """Anchor i's right answer is candidate i: ``recall@k`` = share of anchors whose candidate is in their top k by
    cosine, and ``mrr``."""
    sim = F.normalize(anchors, dim=-1) @ F.normalize(candidates, dim=-1).T
    right = sim.diagonal().unsqueeze(1)
    rank = (sim > right).sum(1) + 1  # 1-based; ties count in the anchor's favour
    out = {f"recall@{k}": float((rank <= k).float().mean()) for k in ks}
    out["mrr"] = float((1.0 / rank.float()).mean())
    return out

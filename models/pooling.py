"""Pooling a transformer's final hidden states into one unit vector per input: what ``/v1/embeddings`` and the
checkpoint embedder (``serve.embeddings``, ``serve.vectors.CheckpointEmbedder``) compute, and what ``genloop
embed-train`` trains (``pipelines.embed``), so a trained retriever is served exactly as it was trained.

Inputs are right-padded: under causal attention a pad after the last real token changes nothing before it, and the
mask leaves the pads out of the pool.
"""

from __future__ import annotations

import torch
import torch.nn as nn

POOLINGS = ("mean", "last")


def pool(hidden: torch.Tensor, mask: torch.Tensor, how: str) -> torch.Tensor:
    """(B, T, D) hidden states, (B, T) 1/0 mask of real tokens (left-aligned) -> (B, D) unit vectors."""
    if how == "mean":
        m = mask.unsqueeze(-1).to(hidden.dtype)
        vec = (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)
    elif how == "last":
        last = mask.sum(1).long() - 1  # (B,) index of each row's last real token
        vec = hidden[torch.arange(hidden.shape[0]), last]
    else:
        raise ValueError(f"pooling {how!r}: use one of {POOLINGS}")
    return nn.functional.normalize(vec.float(), dim=-1)


def pad_right(
    rows: list[list[int]], pad_id: int = 0, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) ids right-padded with ``pad_id`` to the longest row, and the (B, T) 1/0 float mask of real tokens."""
    T = max(1, max((len(r) for r in rows), default=1))
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), T)
    for j, r in enumerate(rows):
        ids[j, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[j, : len(r)] = 1.0
    return ids.to(device), mask.to(device)


def embed_hidden(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, how: str = "mean") -> torch.Tensor:
    """(B, D) unit vectors of ``models.transformer.Transformer`` ``model`` on right-padded (B, T) ``ids``: its final
    normed hidden states (through ``forward``, so a DDP wrapper sees the call), pooled over ``mask``."""
    return pool(model(ids, hidden_only=True), mask, how)

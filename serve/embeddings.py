"""``/v1/embeddings`` of the served model: the final (normed) hidden states of ``models.transformer`` over the input's
tokens, pooled and L2-normalised (no Ray, no vLLM; the generator deployment holds one ``Embedder`` of its live
weights, loaded on first use and dropped at a version switch).

Pooling (``serve.embedding_pooling``): ``mean`` (default) averages the hidden states of all the input's tokens;
``last`` takes the last token's (which, under causal attention, has read the whole input). The vector has the
model's hidden size (``config.json`` hidden_size). A decoder trained only for next-token prediction gives usable but
not tuned similarity: fine for clustering and retrieval baselines, not a replacement for a trained embedding model.
On a GPU replica the embedder is a second copy of the weights (torch, beside vLLM's): leave the route unused on
large models, or serve embeddings from their own application.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

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
    return torch.nn.functional.normalize(vec.float(), dim=-1)


@dataclass
class Embedder:
    model: torch.nn.Module  # models.transformer.Transformer
    batch: int = 16

    @classmethod
    def load(cls, local: str) -> "Embedder":
        from models.checkpoint import load_checkpoint

        device = "cuda" if torch.cuda.is_available() else "cpu"
        model, _ = load_checkpoint(local, device=device)
        return cls(model.eval())

    @torch.no_grad()
    def embed(self, inputs: list[list[int]], how: str = "mean") -> list[list[float]]:
        """One unit vector per token-id list (each non-empty, within the context)."""
        device = next(self.model.parameters()).device
        out: list[list[float]] = []
        for i in range(0, len(inputs), self.batch):
            rows = inputs[i : i + self.batch]
            T = max(len(r) for r in rows)
            ids = torch.zeros(len(rows), T, dtype=torch.long, device=device)
            mask = torch.zeros(len(rows), T, device=device)
            for j, r in enumerate(rows):
                ids[j, : len(r)] = torch.tensor(r, device=device)
                mask[j, : len(r)] = 1.0
            hidden = self.model.hidden_states(
                ids
            )  # (B, T, dim); causal: padding on the right changes nothing before it
            out += pool(hidden, mask, how).cpu().tolist()
        return out

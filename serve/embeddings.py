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

from models.pooling import POOLINGS, embed_hidden, pad_right, pool

__all__ = ["POOLINGS", "Embedder", "pool"]


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
            ids, mask = pad_right(inputs[i : i + self.batch], 0, device)  # (B, T); causal: right pads change nothing
            out += embed_hidden(self.model, ids, mask, how).cpu().tolist()
        return out

"""Fine-tune a bag-of-terms bi-encoder with in-batch-negative InfoNCE: ``embed(text) = normalise(sum_t w_t E[t])``
with ``w_t`` the text's TF-IDF weights (given, fixed) and ``E`` (vocab x dim) the trained matrix, shared by queries
and documents. Initialised from LSA's projection, training starts from what LSA retrieves and moves ``E`` so a
docstring lands next to its code.

Inputs are bags: ``(ids, weights, offsets)`` as ``torch.nn.EmbeddingBag`` takes them (``bags`` builds them from
``{term id: weight}`` dicts). One process, plain torch: in-batch negatives need the whole batch on one device, and
the model is small (a 45k x 256 matrix trains in a minute on a CPU).
"""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from pipelines.embed.loss import SCALE, info_nce, recall_at

log = logging.getLogger(__name__)

Bag = dict[int, float]


@dataclass
class EmbedTrainConfig:
    epochs: int = 4
    batch: int = 256
    lr: float = 3e-3
    weight_decay: float = 0.0
    scale: float = SCALE
    seed: int = 0


def bags(rows: list[Bag]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ids, weights, offsets = [], [], []
    for r in rows:
        offsets.append(len(ids))
        ids += list(r.keys())
        weights += list(r.values())
    return (torch.tensor(ids, dtype=torch.long), torch.tensor(weights, dtype=torch.float32),
            torch.tensor(offsets, dtype=torch.long))


class BagEncoder(nn.Module):
    def __init__(self, init: torch.Tensor) -> None:
        super().__init__()
        self.bag = nn.EmbeddingBag(init.shape[0], init.shape[1], mode="sum")
        with torch.no_grad():
            self.bag.weight.copy_(init)

    def forward(self, rows: list[Bag]) -> torch.Tensor:
        ids, w, off = bags(rows)
        return F.normalize(self.bag(ids, off, per_sample_weights=w), dim=-1)


def evaluate(model: BagEncoder, queries: list[Bag], docs: list[Bag]) -> dict[str, float]:
    with torch.no_grad():
        return recall_at(model(queries), model(docs))


def train(init: torch.Tensor, train_q: list[Bag], train_d: list[Bag], test_q: list[Bag], test_d: list[Bag],
          cfg: EmbedTrainConfig) -> tuple[torch.Tensor, dict]:
    """The trained matrix and ``{"before": held-out recall, "after": ..., "steps", "seconds", "losses"}``."""
    torch.manual_seed(cfg.seed)
    model = BagEncoder(init.float())
    before = evaluate(model, test_q, test_d)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    order = list(range(len(train_q)))
    rng = random.Random(cfg.seed)
    losses, steps, t0 = [], 0, time.perf_counter()
    total = cfg.epochs * math.ceil(len(order) / cfg.batch)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20) * max(0.0, 1 - s / max(1, total)))
    for epoch in range(cfg.epochs):
        rng.shuffle(order)
        for i in range(0, len(order) - 1, cfg.batch):
            idx = order[i:i + cfg.batch]
            if len(idx) < 2:
                continue
            loss_sum, n = info_nce(model([train_q[j] for j in idx]), model([train_d[j] for j in idx]), cfg.scale)
            loss = loss_sum / n
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            steps += 1
        log.info("embed-train epoch %d: mean loss %.3f, held-out %s", epoch + 1,
                 sum(losses[-50:]) / max(1, len(losses[-50:])), evaluate(model, test_q, test_d))
    after = evaluate(model, test_q, test_d)
    return model.bag.weight.detach().clone(), {"before": before, "after": after, "steps": steps,
                                               "seconds": time.perf_counter() - t0, "losses": losses}

"""Fine-tune a bag-of-terms bi-encoder (``BagEncoder``) with in-batch-negative InfoNCE on the shared training loop
(``pipelines.train.loop.fit``: Ray Train workers, or in this process with ``in_process``). ``embed(text) =
normalise(sum_t w_t E[t])`` with ``w_t`` the text's TF-IDF weights (given, fixed) and ``E`` (vocab x dim) the trained
matrix; initialised from LSA's projection, training starts from what LSA retrieves and moves ``E`` so a docstring
lands next to its code. Held-out recall@1/5 and MRR are measured before and after.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass

import numpy as np
import torch

from pipelines.embed.loss import SCALE, recall_at
from pipelines.embed.objective import BagEncoder, InfoNCEObjective, pad_bags
from pipelines.train.config import TrainLoopConfig
from pipelines.train.loop import fit

log = logging.getLogger(__name__)

Bag = dict[int, float]
WEIGHT_FILE = "weight.npy"  # what the export writes into the output folder


@dataclass
class EmbedTrainConfig:
    epochs: int = 4
    batch: int = 256  # pairs per step: each query's candidates are the batch's documents
    lr: float = 3e-3
    scale: float = SCALE
    width: int = 256  # terms kept per bag (the heaviest)
    seed: int = 0
    num_workers: int = 1


def embed_loop_config(
    steps: int, batch: int, lr: float, seed: int, num_workers: int, use_gpu: bool = False, warmup: int = -1
) -> TrainLoopConfig:
    """The shared loop's settings for a retriever: ``batch`` pairs a micro-batch (the in-batch negatives), cosine
    decay to lr / 10, ``warmup`` steps (-1: min(20, steps / 10)), no eval or checkpoints, DDP past one worker."""
    return TrainLoopConfig(
        steps=steps,
        micro_batch_size=batch,
        lr=lr,
        min_lr=lr / 10,
        warmup_steps=warmup if warmup >= 0 else min(20, steps // 10),
        weight_decay=0.0,
        seed=seed,
        log_every=max(1, steps // 20),
        eval_every=0,
        eval_batches=0,
        ckpt_every=0,
        strategy="none" if num_workers == 1 else "ddp",
        num_workers=num_workers,
        use_gpu=use_gpu,
        name="embed",
        progress=False,
    )


def evaluate(model: BagEncoder, queries: list[Bag], docs: list[Bag], width: int) -> dict[str, float]:
    (qi, qw), (di, dw) = pad_bags(queries, width), pad_bags(docs, width)
    with torch.no_grad():
        return recall_at(
            model(torch.from_numpy(qi), torch.from_numpy(qw)), model(torch.from_numpy(di), torch.from_numpy(dw))
        )


def _export(base: torch.nn.Module, state: dict, out: str) -> str:
    path = os.path.join(out, WEIGHT_FILE)
    np.save(path, state["bag.weight"].detach().cpu().float().numpy())
    return path


def train(
    init: torch.Tensor,
    train_q: list[Bag],
    train_d: list[Bag],
    test_q: list[Bag],
    test_d: list[Bag],
    cfg: EmbedTrainConfig,
    out: str,
    in_process: bool = False,
) -> tuple[torch.Tensor, dict]:
    """The trained matrix and ``{"before": held-out recall, "after": ..., "steps", "losses"}``; the loop's metrics
    and loss curve land in ``out``."""
    if len(train_q) < cfg.batch:
        raise ValueError(f"{len(train_q)} training pairs, fewer than one batch of {cfg.batch}; lower the batch")
    os.makedirs(out, exist_ok=True)
    before = evaluate(BagEncoder(init), test_q, test_d, cfg.width)
    qi, qw = pad_bags(train_q, cfg.width)
    di, dw = pad_bags(train_d, cfg.width)
    rows = {"q_ids": qi, "q_w": qw, "d_ids": di, "d_w": dw}
    steps = max(1, cfg.epochs * len(train_q) // (cfg.batch * cfg.num_workers))
    loop = embed_loop_config(steps, cfg.batch, cfg.lr, cfg.seed, cfg.num_workers)
    init_cpu = init.detach().float().cpu().clone()
    res = fit(
        loop,
        lambda: BagEncoder(init_cpu),
        rows,
        None,
        out,
        export=_export,
        in_process=in_process,
        objective=InfoNCEObjective(cfg.scale),
    )
    weight = torch.from_numpy(np.load(os.path.join(out, WEIGHT_FILE)))
    after = evaluate(BagEncoder(weight), test_q, test_d, cfg.width)
    losses = [r["loss"] for r in res.history if "loss" in r and not math.isnan(r["loss"])]
    return weight, {"before": before, "after": after, "steps": res.steps, "losses": losses}

"""Fine-tune a transformer checkpoint (one genloop trained, or an imported Hugging Face folder) into a bi-encoder:
``embed(text) = normalise(mean over the text's tokens of the final normed hidden states)`` (``models.pooling``), one
model for both sides, trained with in-batch-negative InfoNCE (``TokenInfoNCEObjective``) on the shared training loop
(``pipelines.train.loop.fit``: Ray Train workers, or in this process with ``in_process``).

Texts are encoded as the ``ckpt:`` embedder encodes them (``tokenizer.encode``, no special tokens) and cut to
``max_tokens`` per side. The export is an ordinary checkpoint in ``<out>/model`` (``save_checkpoint``, the model's
own tokenizer files kept; the output head is carried along untouched) plus ``embedder.json`` (``max_tokens``), so
``ckpt:<out>`` serves it with the training's truncation. Held-out recall@1/5 and MRR are measured before and after,
with the same truncation.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch

from pipelines.embed.loss import SCALE, recall_at
from pipelines.embed.objective import TokenInfoNCEObjective, encode_tokens, pad_tokens
from pipelines.embed.train import embed_loop_config
from pipelines.train.config import MODEL_DIR
from pipelines.train.loop import fit
from pipelines.train.state import hf_export

log = logging.getLogger(__name__)


@dataclass
class BiEncoderConfig:
    epochs: int = 1
    steps: int = 0  # optimizer steps; 0 = epochs over the training pairs
    batch: int = 32  # pairs per step and worker: each query's candidates are the batch's documents
    lr: float = 5e-5
    warmup_steps: int = -1  # -1 = a tenth of the steps, at most 20
    scale: float = SCALE
    max_tokens: int = 128  # tokens kept per side (the first ones: a function's signature and start)
    seed: int = 0
    num_workers: int = 1
    use_gpu: bool | None = None  # None = GPUs if the cluster has them
    eval_batch: int = 64


def build_bi_encoder(init_from: str) -> torch.nn.Module:
    """The loop's model factory (every worker): the checkpoint's ``Transformer``, on CPU (the loop moves it). The
    output head takes no part (only the trunk's hidden states are pooled): an untied head is frozen so it is neither
    optimised nor waited for by DDP."""
    from models.checkpoint import load_checkpoint

    model, _ = load_checkpoint(init_from)
    if not model.cfg.tie_embeddings:
        model.lm_head.weight.requires_grad_(False)
    return model


EMBEDDER_FILE = "embedder.json"  # beside the exported weights: how the bi-encoder was trained to read its inputs


def write_embedder_settings(model_dir: str, max_tokens: int) -> None:
    """Record the truncation the bi-encoder was trained with (``max_tokens`` per text, mean pooling) in
    ``<model_dir>/embedder.json``: the ``ckpt:`` embedder that serves it cuts its inputs there too, not at the
    model's context, so a served document is embedded as the training documents were."""
    import json

    with open(os.path.join(model_dir, EMBEDDER_FILE), "w") as f:
        json.dump({"max_tokens": int(max_tokens), "pooling": "mean"}, f)


def token_rows(tok, texts: list[str], max_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """(N, max_tokens) right-padded ids and (N,) lengths of ``texts``, encoded as the ``ckpt:`` embedder does."""
    return pad_tokens([tok.encode(t) for t in texts], max_tokens, tok.pad_id)


@torch.no_grad()
def embed_rows(model: torch.nn.Module, ids: np.ndarray, lens: np.ndarray, batch: int) -> torch.Tensor:
    """(N, D) unit vectors of padded token rows, ``batch`` rows at a time (on the model's device)."""
    model.eval()
    device = next(model.parameters()).device
    out = [
        encode_tokens(
            model, torch.from_numpy(ids[i : i + batch]).to(device), torch.from_numpy(lens[i : i + batch]).to(device)
        ).cpu()
        for i in range(0, len(ids), batch)
    ]
    return torch.cat(out) if out else torch.zeros(0, model.cfg.dim)


def evaluate(model: torch.nn.Module, held_out: dict[str, np.ndarray], batch: int) -> dict[str, float]:
    """Held-out recall@1/5 and MRR: each query against every held-out document (on a GPU when this process has
    one)."""
    if torch.cuda.is_available():
        model = model.to("cuda")
    q = embed_rows(model, held_out["q_ids"], held_out["q_len"], batch)
    d = embed_rows(model, held_out["d_ids"], held_out["d_len"], batch)
    return recall_at(q, d)


def pair_rows(tok, queries: list[str], docs: list[str], max_tokens: int) -> dict[str, np.ndarray]:
    (qi, ql), (di, dl) = token_rows(tok, queries, max_tokens), token_rows(tok, docs, max_tokens)
    return {"q_ids": qi, "q_len": ql, "d_ids": di, "d_len": dl}


def train_bi_encoder(
    init_from: str,
    train_pairs: tuple[list[str], list[str]],
    test_pairs: tuple[list[str], list[str]],
    cfg: BiEncoderConfig,
    out: str,
    in_process: bool = False,
) -> dict:
    """Train ``init_from`` (a checkpoint folder, absolute for Ray workers) on ``(queries, documents)`` and export it to
    ``<out>/model``. Returns ``{"before": held-out recall, "after": ..., "steps", "losses", "model", "metrics"}``; the
    loop's metrics and loss curve land in ``out``."""
    from models.checkpoint import load_checkpoint, load_tokenizer

    init_from = os.path.abspath(init_from)
    tok = load_tokenizer(init_from)
    n = len(train_pairs[0])
    rows_per_step = cfg.batch * cfg.num_workers
    if n < rows_per_step:
        raise ValueError(
            f"{n} training pairs, fewer than one step of {rows_per_step} (--batch x --workers); lower the batch"
        )
    rows = pair_rows(tok, *train_pairs, cfg.max_tokens)
    held = pair_rows(tok, *test_pairs, cfg.max_tokens)
    cut = int((rows["d_len"] >= cfg.max_tokens).sum())
    log.info("embed-train: %d of %d training documents cut to %d tokens", cut, n, cfg.max_tokens)
    before = evaluate(build_bi_encoder(init_from), held, cfg.eval_batch)
    steps = cfg.steps or max(1, cfg.epochs * n // rows_per_step)
    loop = embed_loop_config(steps, cfg.batch, cfg.lr, cfg.seed, cfg.num_workers, cfg.use_gpu, cfg.warmup_steps)
    res = fit(
        loop,
        partial(build_bi_encoder, init_from),
        rows,
        None,
        out,
        export=hf_export(init_from),
        in_process=in_process,
        objective=TokenInfoNCEObjective(cfg.scale),
    )
    model_dir = os.path.join(out, MODEL_DIR)
    write_embedder_settings(model_dir, cfg.max_tokens)
    trained, _ = load_checkpoint(model_dir)
    after = evaluate(trained, held, cfg.eval_batch)
    losses = [r["loss"] for r in res.history if "loss" in r and not math.isnan(r["loss"])]
    return {
        "before": before,
        "after": after,
        "steps": res.steps,
        "losses": losses,
        "model": model_dir,
        "metrics": res.final_metrics(),
        "cut_documents": cut,
    }

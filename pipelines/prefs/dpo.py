"""``genloop dpo --init-from SFT_CKPT --data PREFS --out DIR``: offline DPO on the shared loop.

Pairs are read and rendered as for the reward model (``pipelines/prefs/pairs.py``). The reference model is the
``init_from`` checkpoint itself; its sequence log-probs of every chosen and rejected answer are computed ONCE before
training, as dataset columns (``ref_chosen_logp`` / ``ref_rejected_logp``; TRL's precompute), by a Ray Data
``map_batches`` actor, so no reference model stays resident while the policy trains. The loss is one of
``pipelines.prefs.objectives.DPO_LOSSES`` (``sigmoid`` with optional ``label_smoothing``, ``ipo``, ``hinge``), ``beta``
configurable.

Reported on held-out pairs (``val_data``, a ``pref-data`` folder's ``val.jsonl``, or ``val_fraction`` split by
prompt), with the exported policy: preference accuracy (chosen implicit reward > rejected), mean implicit reward
margin, mean chosen / rejected rewards; also how often the policy's own log-prob ranks the chosen answer first,
before and after. Output ``DIR/model``: a Hugging Face causal-LM checkpoint (``genloop serve`` serves it as is).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import torch

from pipelines.train.config import MODEL_DIR, TrainLoopConfig

log = logging.getLogger(__name__)


@dataclass
class DpoConfig:
    init_from: str = ""  # the SFT checkpoint: the policy's start and the reference
    data: str = ""  # preference JSONL, or a folder with train.jsonl [+ val.jsonl] (genloop pref-data)
    val_data: str = ""
    val_fraction: float = 0.1
    out: str = ""
    seq_len: int = 0  # tokens per side; 0 = the checkpoint's max_seq_len; longer pairs dropped
    beta: float = 0.1
    loss: str = "sigmoid"  # a name in pipelines.prefs.objectives.DPO_LOSSES: sigmoid | ipo | hinge
    label_smoothing: float = 0.0  # sigmoid only: conservative DPO
    train: TrainLoopConfig = field(
        default_factory=lambda: TrainLoopConfig(
            name="dpo", lr=5e-5, min_lr=5e-6, warmup_steps=5, weight_decay=0.0, eval_every=50, ckpt_every=0
        )
    )
    in_process: bool = False
    ref_batch_size: int = 16
    seed: int = 0
    overwrite: bool = False


@torch.no_grad()
def reference_logps(model: Any, rows: dict[str, np.ndarray], batch_size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """(chosen, rejected) summed answer log-probs (N,) of a causal LM over pair rows."""
    from pipelines.prefs.objectives import sequence_logps, trim_to_answers

    model.eval()
    out_c, out_r = [], []
    n = len(rows["chosen_ids"])
    for lo in range(0, n, batch_size):
        sl = slice(lo, lo + batch_size)
        for side, out in (("chosen", out_c), ("rejected", out_r)):
            ids = torch.from_numpy(np.asarray(rows[f"{side}_ids"][sl], dtype=np.int64))
            labels = torch.from_numpy(np.asarray(rows[f"{side}_labels"][sl], dtype=np.int64))
            ids, labels = trim_to_answers(ids, labels)
            out.append(sequence_logps(model(ids), labels).numpy())
    return np.concatenate(out_c).astype(np.float32), np.concatenate(out_r).astype(np.float32)


class ReferenceLogps:
    """Ray Data ``map_batches`` actor: adds ``ref_chosen_logp`` / ``ref_rejected_logp`` columns to pair rows."""

    def __init__(self, init_from: str, batch_size: int) -> None:
        from models.checkpoint import load_checkpoint
        from pipelines.artifacts import local_copy

        # the one actor runs before training starts, while the driver waits: every core (it reserves one CPU)
        torch.set_num_threads(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
        self.model, _ = load_checkpoint(local_copy(init_from))
        self.batch_size = batch_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = {k: np.stack(v) if v.dtype == object else v for k, v in batch.items()}
        rows["ref_chosen_logp"], rows["ref_rejected_logp"] = reference_logps(self.model, rows, self.batch_size)
        return rows


def with_reference(ds: Any, init_from: str, batch_size: int) -> Any:
    """The dataset with reference log-prob columns, computed once by one actor and materialised."""
    from ray.data import ActorPoolStrategy

    return ds.map_batches(
        ReferenceLogps,
        fn_constructor_args=(init_from, batch_size),
        batch_size=64,
        batch_format="numpy",
        compute=ActorPoolStrategy(size=1),
        num_cpus=1,
    ).materialize()


def preference_eval(policy: Any, rows: dict[str, np.ndarray], beta: float, batch_size: int = 16) -> dict[str, float]:
    """Held-out DPO numbers of ``policy`` on rows holding reference log-probs."""
    if not rows:
        return {}
    pc, pr = reference_logps(policy, rows, batch_size)
    rc = beta * (pc - rows["ref_chosen_logp"])
    rr = beta * (pr - rows["ref_rejected_logp"])
    return {
        "preference_accuracy": float(np.mean(rc > rr)),
        "reward_margin": float(np.mean(rc - rr)),
        "chosen_reward": float(np.mean(rc)),
        "rejected_reward": float(np.mean(rr)),
        "logp_accuracy": float(np.mean(pc > pr)),
        "pairs": len(rc),
    }


def build_policy(init_from: str) -> Any:
    from models.checkpoint import load_checkpoint
    from pipelines.artifacts import local_copy

    model, _ = load_checkpoint(local_copy(init_from))
    return model


def run(cfg: DpoConfig) -> dict[str, Any]:
    """Train and export the DPO policy; needs a ready Ray runtime. Returns the metrics."""
    from models.checkpoint import load_checkpoint
    from pipelines.artifacts import join, local_copy
    from pipelines.prefs.objectives import DPOObjective
    from pipelines.prefs.pairs import begin_pair_stage, to_dataset
    from pipelines.train.loop import fit
    from pipelines.train.state import hf_export

    objective = DPOObjective(cfg.beta, cfg.label_smoothing, cfg.loss)  # validates beta / loss / smoothing
    st = begin_pair_stage("dpo", cfg)
    cfg, rows, val_rows, counts = st.cfg, st.rows, st.val_rows, st.counts

    t0 = time.perf_counter()
    train_ds = with_reference(to_dataset(rows), cfg.init_from, cfg.ref_batch_size)
    ref, _ = load_checkpoint(st.init_local)
    if val_rows:
        val_rows["ref_chosen_logp"], val_rows["ref_rejected_logp"] = reference_logps(ref, val_rows, cfg.ref_batch_size)
    before = preference_eval(ref, val_rows, cfg.beta, cfg.ref_batch_size)
    del ref
    ref_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    result = fit(
        st.loop,
        partial(build_policy, cfg.init_from),
        train_ds,
        to_dataset(val_rows) if val_rows else None,
        cfg.out,
        export=hf_export(cfg.init_from),
        objective=objective,
        in_process=cfg.in_process,
    )
    train_s = time.perf_counter() - t0
    policy, _ = load_checkpoint(local_copy(join(cfg.out, MODEL_DIR)))
    after = preference_eval(policy, val_rows, cfg.beta, cfg.ref_batch_size)
    metrics = {
        **{f"heldout_{k}": v for k, v in after.items() if k != "pairs"},
        "heldout_logp_accuracy_before": before.get("logp_accuracy"),
        "reference_seconds": ref_s,
        "train_seconds": train_s,
        "steps": result.steps,
        **result.final_metrics(),
    }
    st.artifact.finish(counts=dict(counts), metrics=metrics)
    log.info(
        "dpo policy -> %s: held-out preference accuracy %s, reward margin %s",
        result.model_dir,
        metrics.get("heldout_preference_accuracy"),
        metrics.get("heldout_reward_margin"),
    )
    return {"out": cfg.out, "model": join(cfg.out, MODEL_DIR), **metrics, "counts": dict(counts)}

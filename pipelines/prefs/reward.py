"""``genloop reward --init-from SFT_CKPT --data PREFS --out DIR``: a Bradley-Terry reward model on the shared loop.

The model is the SFT checkpoint's trunk + a scalar head (``models/scalar_model.py``), trained with
``-log sigmoid(r_chosen - r_rejected - margin)`` (``pipelines/prefs/objectives.py``) on Ray Train (DDP | FSDP2, or in
process). Pairs are rendered with the checkpoint's chat template (prompt as user turn, answer as assistant turn;
``pipelines/prefs/pairs.py`` reads the accepted JSONL forms and quarantines bad lines).

Held-out pairs (``val_data``, the ``val.jsonl`` of a ``pref-data`` folder, or ``val_fraction`` of the pairs split by
prompt) give the reported pairwise accuracy and mean margin, measured on the exported model after training (and on
the untrained head before, for comparison). Output ``DIR``: ``model/`` (loads with
``transformers.AutoModelForSequenceClassification``), ``manifest.json`` (counts, metrics), ``metrics.jsonl/.csv``,
``loss_curve.png``, ``quarantine.jsonl`` (bad input lines, when any).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import torch

from pipelines.train.config import MODEL_DIR, TrainLoopConfig

log = logging.getLogger(__name__)


@dataclass
class RewardConfig:
    init_from: str = ""  # the SFT checkpoint (HF causal LM folder or an artifact with model/)
    data: str = ""  # preference JSONL, or a folder with train.jsonl [+ val.jsonl] (genloop pref-data)
    val_data: str = ""  # held-out JSONL; "" = the folder's val.jsonl, else val_fraction of the pairs
    val_fraction: float = 0.1
    out: str = ""
    seq_len: int = 0  # tokens per side (prompt + answer); 0 = the checkpoint's max_seq_len; longer pairs dropped
    head_std: float = 0.0  # the score head's init std; 0 = the model's init_std
    train: TrainLoopConfig = field(
        default_factory=lambda: TrainLoopConfig(
            name="reward", lr=1e-4, min_lr=1e-5, warmup_steps=5, weight_decay=0.0, eval_every=50, ckpt_every=0
        )
    )
    in_process: bool = False  # run the loop in this process (strategy none, one worker) instead of Ray Train
    eval_batch_size: int = 16
    seed: int = 0
    overwrite: bool = False


def build_reward_model(init_from: str, head_std: float) -> Any:
    """The loop's model factory (every worker): the checkpoint's trunk + a fresh scalar head (seeded)."""
    from models.scalar_model import from_causal_lm
    from pipelines.artifacts import local_copy

    torch.manual_seed(0)
    model, _ = from_causal_lm(local_copy(init_from), head_std=head_std or None)
    return model


def export_reward_model(model: Any, state_dict: dict, out: str, init_from: str) -> str:
    """The loop's export (rank 0): ``<out>/model`` as a HF ``LlamaForSequenceClassification`` folder."""
    from models.checkpoint import load_tokenizer
    from models.scalar_model import save_scalar_model
    from pipelines.artifacts import join, local_copy
    from pipelines.train.state import local_dir

    target = join(out, MODEL_DIR)
    with local_dir(target) as local:
        save_scalar_model(model, load_tokenizer(local_copy(init_from)), local, state_dict=state_dict)
    return target


@torch.no_grad()
def pairwise_eval(model: Any, rows: dict[str, np.ndarray], pad_id: int, batch_size: int = 16) -> dict[str, float]:
    """Held-out pairwise accuracy (r_chosen > r_rejected), mean margin (r_chosen - r_rejected) and BT loss of a
    scalar model on pair rows; empty rows give {}."""
    from pipelines.prefs.objectives import BradleyTerryObjective

    if not rows:
        return {}
    obj = BradleyTerryObjective(pad_id)
    model.eval()
    n = len(rows["chosen_ids"])
    acc = margin = loss = 0.0
    for lo in range(0, n, batch_size):
        b = {k: torch.from_numpy(v[lo : lo + batch_size]) for k, v in rows.items()}
        ls, _, m = obj(model, b)
        acc, margin, loss = acc + float(m["accuracy"]), margin + float(m["margin"]), loss + float(ls)
    return {"pairwise_accuracy": acc / n, "mean_margin": margin / n, "loss": loss / n, "pairs": n}


def run(cfg: RewardConfig) -> dict[str, Any]:
    """Train and export the reward model; needs a ready Ray runtime unless ``in_process``. Returns the metrics."""
    from models.scalar_model import load_scalar_model
    from pipelines.artifacts import join, local_copy
    from pipelines.prefs.objectives import BradleyTerryObjective
    from pipelines.prefs.pairs import begin_pair_stage, to_dataset
    from pipelines.train.loop import fit

    st = begin_pair_stage("reward", cfg)
    cfg, tok, rows, val_rows, counts = st.cfg, st.tok, st.rows, st.val_rows, st.counts

    build = partial(build_reward_model, cfg.init_from, cfg.head_std)
    before = pairwise_eval(build(), val_rows, tok.pad_id, cfg.eval_batch_size)
    t0 = time.perf_counter()
    result = fit(
        st.loop,
        build,
        to_dataset(rows),
        to_dataset(val_rows) if val_rows else None,
        cfg.out,
        export=partial(export_reward_model, init_from=cfg.init_from),
        objective=BradleyTerryObjective(tok.pad_id),
        in_process=cfg.in_process,
    )
    train_s = time.perf_counter() - t0
    model, _ = load_scalar_model(local_copy(join(cfg.out, MODEL_DIR)))
    after = pairwise_eval(model, val_rows, tok.pad_id, cfg.eval_batch_size)
    metrics = {
        "heldout_pairwise_accuracy": after.get("pairwise_accuracy"),
        "heldout_mean_margin": after.get("mean_margin"),
        "heldout_loss": after.get("loss"),
        "heldout_pairwise_accuracy_before": before.get("pairwise_accuracy"),
        "train_seconds": train_s,
        "steps": result.steps,
        **result.final_metrics(),
    }
    if not val_rows:
        log.warning("reward: no held-out pairs (val_fraction=%s): held-out accuracy is not measured", cfg.val_fraction)
    st.artifact.finish(counts=dict(counts), metrics=metrics)
    log.info(
        "reward model -> %s: held-out pairwise accuracy %s (before %s), mean margin %s",
        result.model_dir,
        metrics["heldout_pairwise_accuracy"],
        metrics["heldout_pairwise_accuracy_before"],
        metrics["heldout_mean_margin"],
    )
    return {"out": cfg.out, "model": join(cfg.out, MODEL_DIR), **metrics, "counts": dict(counts)}

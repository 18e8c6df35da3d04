"""Preference losses (small pure functions on scores / log-probs, never a model) and the training-loop objectives
built on them: Bradley-Terry for the reward model, DPO (a registry of loss kinds) for the policy.

Pair rows (``pipelines/prefs/pairs.py`` makes them), every column (T,) unless said:

* ``chosen_ids`` / ``rejected_ids``: the whole rendered conversation (prompt + answer), right-padded with the pad
  token. A scalar model's score is read at the last non-pad token (as transformers does).
* ``chosen_labels`` / ``rejected_labels``: ``labels[t] = ids[t+1]`` on answer tokens, -100 elsewhere (DPO's
  sequence log-prob sums over them).
* ``margin`` (): the Bradley-Terry margin (0 when the data has none).
* ``ref_chosen_logp`` / ``ref_rejected_logp`` (): DPO's reference log-probs, computed once before training.

Every objective counts one unit per pair, so logged ``loss``/``accuracy``/``margin`` are means over pairs.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from pipelines.train.objective import IGNORE, Objective


# ---- losses --------------------------------------------------------------------------------------------------------
def bradley_terry_loss(
    r_chosen: torch.Tensor, r_rejected: torch.Tensor, margin: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-pair ``-log sigmoid(r_chosen - r_rejected - margin)``; all (B,)."""
    diff = r_chosen - r_rejected
    if margin is not None:
        diff = diff - margin
    return -F.logsigmoid(diff)


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B,) summed log-probabilities of the labelled tokens (``labels != -100``); logits (B, T, V), labels (B, T)."""
    mask = labels != IGNORE
    logp = torch.log_softmax(logits.float(), dim=-1)
    picked = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (B, T)
    return (picked * mask).sum(-1)


def trim_to_answers(ids: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``ids`` / ``labels`` (B, T) cut after the last labelled position of any row: the columns after it are padding,
    and a causal model's logits before them do not depend on them. Rows padded to ``seq_len`` (256) around short
    answers (a sum: ~60 tokens) cost a quarter of the forward pass."""
    labelled = (labels != IGNORE).any(0).nonzero()
    t = int(labelled[-1]) + 1 if len(labelled) else 1
    return ids[:, :t], labels[:, :t]


def _dpo_sigmoid(logits: torch.Tensor, beta: float, label_smoothing: float) -> torch.Tensor:
    """DPO (Rafailov et al.); with label smoothing, conservative DPO (labels flipped with that probability)."""
    return -F.logsigmoid(beta * logits) * (1 - label_smoothing) - F.logsigmoid(-beta * logits) * label_smoothing


def _dpo_ipo(logits: torch.Tensor, beta: float, label_smoothing: float) -> torch.Tensor:
    """IPO (Azar et al.): squared distance of the log-ratio difference to 1 / (2 beta)."""
    return (logits - 1 / (2 * beta)) ** 2


def _dpo_hinge(logits: torch.Tensor, beta: float, label_smoothing: float) -> torch.Tensor:
    """SLiC-style hinge on the scaled log-ratio difference."""
    return torch.relu(1 - beta * logits)


# name -> loss(logits (B,), beta, label_smoothing) -> (B,); logits = chosen log-ratio - rejected log-ratio
DPO_LOSSES: dict[str, Callable[[torch.Tensor, float, float], torch.Tensor]] = {
    "sigmoid": _dpo_sigmoid,
    "ipo": _dpo_ipo,
    "hinge": _dpo_hinge,
}


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    kind: str = "sigmoid",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-pair loss, chosen implicit reward, rejected implicit reward), all (B,), from sequence log-probs (B,).

    Implicit reward = ``beta * (log pi(y|x) - log pi_ref(y|x))``."""
    if kind not in DPO_LOSSES:
        raise ValueError(f"unknown DPO loss {kind!r}; known: {', '.join(DPO_LOSSES)}")
    chosen_ratio = policy_chosen - ref_chosen
    rejected_ratio = policy_rejected - ref_rejected
    loss = DPO_LOSSES[kind](chosen_ratio - rejected_ratio, beta, label_smoothing)
    return loss, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


# ---- objectives for the shared loop --------------------------------------------------------------------------------
class _PairObjective(Objective):
    dtypes = {"margin": np.float32, "ref_chosen_logp": np.float32, "ref_rejected_logp": np.float32}

    def row_counts(self, rows):
        return np.ones(len(rows["chosen_ids"]), dtype=np.int64)

    def row_tokens(self, rows):
        return 2 * int(rows["chosen_ids"].shape[1])

    @staticmethod
    def both(batch: dict[str, torch.Tensor], key: str) -> torch.Tensor:
        """Chosen then rejected rows stacked: one forward for both sides (2B, T)."""
        return torch.cat([batch[f"chosen_{key}"], batch[f"rejected_{key}"]])


class BradleyTerryObjective(_PairObjective):
    """The reward model's loss on a scalar model (``models/scalar_model.py``): metrics ``accuracy`` (r_chosen >
    r_rejected) and ``margin`` (mean r_chosen - r_rejected)."""

    name = "bradley-terry"
    loss_label = "-log sigmoid(r_chosen - r_rejected - margin)"
    columns = ("chosen_ids", "rejected_ids", "margin")
    required = ("chosen_ids", "rejected_ids")

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def scores(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        from models.scalar_model import sequence_scores

        ids = self.both(batch, "ids")
        r = sequence_scores(model(ids), ids, self.pad_id)  # (2B,)
        return r.chunk(2)

    def __call__(self, model, batch):
        rc, rr = self.scores(model, batch)
        loss = bradley_terry_loss(rc, rr, batch.get("margin"))
        diff = (rc - rr).detach()
        return loss.sum(), torch.tensor(len(rc)), {"accuracy": (diff > 0).float().sum(), "margin": diff.sum()}


class DPOObjective(_PairObjective):
    """Offline DPO on a causal LM against precomputed reference log-probs: metrics ``accuracy`` (chosen implicit
    reward > rejected), ``margin`` (mean reward difference), ``chosen_reward``, ``rejected_reward``."""

    name = "dpo"
    loss_label = "DPO loss"
    columns = ("chosen_ids", "rejected_ids", "chosen_labels", "rejected_labels", "ref_chosen_logp", "ref_rejected_logp")
    required = columns

    def __init__(self, beta: float = 0.1, label_smoothing: float = 0.0, kind: str = "sigmoid") -> None:
        if kind not in DPO_LOSSES:
            raise ValueError(f"dpo.loss={kind!r} is unknown; known: {', '.join(DPO_LOSSES)}")
        if beta <= 0:
            raise ValueError(f"dpo.beta={beta} must be > 0")
        if not 0 <= label_smoothing < 0.5:
            raise ValueError(f"dpo.label_smoothing={label_smoothing} must be in [0, 0.5)")
        self.beta, self.label_smoothing, self.kind = beta, label_smoothing, kind

    def __call__(self, model, batch):
        ids, labels = trim_to_answers(self.both(batch, "ids"), self.both(batch, "labels"))
        pc, pr = sequence_logps(model(ids), labels).chunk(2)  # logits (2B, T', V)
        loss, rc, rr = dpo_loss(
            pc, pr, batch["ref_chosen_logp"], batch["ref_rejected_logp"], self.beta, self.label_smoothing, self.kind
        )
        return (
            loss.sum(),
            torch.tensor(len(pc)),
            {
                "accuracy": (rc > rr).float().sum(),
                "margin": (rc - rr).sum(),
                "chosen_reward": rc.sum(),
                "rejected_reward": rr.sum(),
            },
        )

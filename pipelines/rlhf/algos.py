"""Advantage estimators, KL estimators and policy losses: small pure functions on tensors, registered by name.

The registry has verl's ``core_algos`` shape (``register_adv_est`` / ``get_adv_estimator``, ``register_policy_loss`` /
``get_policy_loss``), kept small. Nothing here takes a model: inputs are log-probs, rewards, values and masks, so
every function is checked against hand-computed values on CPU (tests/test_rl_algos.py).

Shapes: ``B`` samples (a batch is ``n_prompts x group_size`` answers, grouped consecutively), ``T`` response tokens
(right-padded); ``mask`` (B, T) is 1.0 on real response tokens.

Names follow prime-rl: ``logp`` the learner's current log-probs, ``old_logp`` the learner's log-probs of the same
tokens before this iteration's updates, ``rollout_logp`` vLLM's (the inference engine's) log-probs.
"""

from __future__ import annotations

from typing import Callable

import torch

AdvEstimator = Callable[..., tuple[torch.Tensor, torch.Tensor]]
PolicyLoss = Callable[..., tuple[torch.Tensor, dict[str, float]]]

ADV_ESTIMATORS: dict[str, AdvEstimator] = {}
POLICY_LOSSES: dict[str, PolicyLoss] = {}


def register_adv_est(name: str) -> Callable[[AdvEstimator], AdvEstimator]:
    def deco(fn: AdvEstimator) -> AdvEstimator:
        ADV_ESTIMATORS[name] = fn
        return fn

    return deco


def get_adv_estimator(name: str) -> AdvEstimator:
    if name not in ADV_ESTIMATORS:
        raise ValueError(f"unknown advantage estimator {name!r}; known: {', '.join(sorted(ADV_ESTIMATORS))}")
    return ADV_ESTIMATORS[name]


def register_policy_loss(name: str) -> Callable[[PolicyLoss], PolicyLoss]:
    def deco(fn: PolicyLoss) -> PolicyLoss:
        POLICY_LOSSES[name] = fn
        return fn

    return deco


def get_policy_loss(name: str) -> PolicyLoss:
    if name not in POLICY_LOSSES:
        raise ValueError(f"unknown policy loss {name!r}; known: {', '.join(sorted(POLICY_LOSSES))}")
    return POLICY_LOSSES[name]


# ---- aggregation ---------------------------------------------------------------------------------------------------
def masked_sum(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum()


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the tokens where ``mask`` is 1 (0 when there are none)."""
    return (x * mask).sum() / mask.sum().clamp(min=1.0)


def agg_loss(
    loss_mat: torch.Tensor,
    mask: torch.Tensor,
    mode: str = "token-mean",
    n_tokens: float | None = None,
    n_seqs: float | None = None,
) -> torch.Tensor:
    """(B, T) per-token losses -> a scalar.

    ``token-mean``: sum / ``n_tokens`` (default: this mask's tokens). A data-parallel learner passes the token
    count of the whole minibatch over all ranks (divided by the world size, as DDP averages gradients), so the loss
    does not depend on how samples are split over ranks (verl's ``agg_loss``).
    ``seq-mean-token-mean``: each sequence's token mean, summed and divided by ``n_seqs`` (default: B).
    """
    if mode == "token-mean":
        denom = float(n_tokens) if n_tokens is not None else mask.sum().clamp(min=1.0)
        return (loss_mat * mask).sum() / denom
    if mode == "seq-mean-token-mean":
        per_seq = (loss_mat * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
        return per_seq.sum() / (float(n_seqs) if n_seqs is not None else per_seq.shape[0])
    raise ValueError(f"unknown loss aggregation {mode!r}; use token-mean or seq-mean-token-mean")


# ---- advantages ----------------------------------------------------------------------------------------------------
def as_groups(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """(B,) per-answer scores -> (B / group_size, group_size) float, one row per prompt's group."""
    if scores.shape[0] % group_size:
        raise ValueError(f"{scores.shape[0]} scores are not whole groups of group_size={group_size}")
    return scores.view(-1, group_size).float()


@register_adv_est("grpo")
def grpo_advantages(
    scores: torch.Tensor, mask: torch.Tensor, group_size: int, norm_std: bool = True, eps: float = 1e-6, **_: object
) -> tuple[torch.Tensor, torch.Tensor]:
    """Outcome advantages normalised within each group of ``group_size`` consecutive answers to one prompt.

    scores (B,) -> advantage (B, T) = (score - group mean) [/ (group std + eps)], broadcast over the answer's
    tokens. ``norm_std=False`` is Dr.GRPO (no std scaling, which biases towards easy/hard groups). std is the
    unbiased sample std (torch's default, as verl). Returns (advantages, returns), both (B, T), returns = advantages.
    """
    B = scores.shape[0]
    g = as_groups(scores, group_size)
    centred = g - g.mean(-1, keepdim=True)
    if norm_std:
        std = g.std(-1, keepdim=True) if group_size > 1 else torch.ones_like(g)
        centred = centred / (std + eps)
    adv = centred.reshape(B, 1) * mask
    return adv, adv


def informative_groups(part_scores: torch.Tensor, group_size: int, tol: float = 1e-6) -> torch.Tensor:
    """DAPO's dynamic-sampling filter: (B,) one reward part's scores -> (B,) 1.0 for the answers of groups whose
    scores differ (max - min > ``tol``), 0.0 for groups where every answer scored the same (all pass or all fail).

    Such a group says nothing about that part; with a small second reward (a reward model as a tie-breaker) GRPO's
    group normalisation would blow the tie-breaker up to unit-sized advantages there. DAPO drops these groups and
    samples more prompts; here their policy-gradient advantages are zeroed (the KL term still applies to them).
    """
    g = as_groups(part_scores, group_size)
    keep = (g.max(-1).values - g.min(-1).values) > tol  # (B / group_size,)
    return keep.float().repeat_interleave(group_size)


def pick_groups(keep: torch.Tensor, group_size: int, n_groups: int) -> list[int]:
    """DAPO's dynamic sampling from one over-sampled batch: ``keep`` (B,), ``informative_groups`` of one reward
    part over ``B / group_size`` groups -> the indices of ``n_groups`` groups, the informative ones first (in sampling
    order), then, when too few are, the first uniform ones to keep the learner's batch size fixed. The result is in
    sampling order."""
    per_group = as_groups(keep, group_size)[:, 0].bool().tolist()
    if n_groups > len(per_group):
        raise ValueError(f"pick_groups: {n_groups} groups asked for, {len(per_group)} sampled")
    chosen = [g for g, k in enumerate(per_group) if k][:n_groups]
    chosen += [g for g, k in enumerate(per_group) if not k][: n_groups - len(chosen)]
    return sorted(chosen)


def weight_negatives(advantages: torch.Tensor, weight: float) -> torch.Tensor:
    """Advantages with the negative ones scaled by ``weight`` (positive ones unchanged): any shape."""
    return torch.where(advantages < 0, advantages * weight, advantages)


@register_adv_est("gae")
def gae_advantages(
    token_rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
    **_: object,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over each response (PPO).

    token_rewards, values, mask (B, T). delta_t = r_t + gamma V_{t+1} - V_t (V after the last real token is 0);
    A_t = delta_t + gamma lam A_{t+1}; returns = A + V. Padding positions get 0. Returns (advantages, returns).
    """
    B, T = token_rewards.shape
    adv = torch.zeros_like(token_rewards, dtype=torch.float32)
    next_value = torch.zeros(B, dtype=torch.float32)
    next_adv = torch.zeros(B, dtype=torch.float32)
    r, v, m = token_rewards.float(), values.float(), mask.float()
    for t in reversed(range(T)):
        delta = r[:, t] + gamma * next_value - v[:, t]
        a = delta + gamma * lam * next_adv
        # padding: carry the next real values through unchanged (responses are right-padded, so this is 0)
        next_adv = m[:, t] * a + (1 - m[:, t]) * next_adv
        next_value = m[:, t] * v[:, t] + (1 - m[:, t]) * next_value
        adv[:, t] = a * m[:, t]
    return adv, (adv + v) * m


def whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the masked tokens (PPO's advantage normalisation over the batch)."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return (x - mean) * torch.rsqrt(var + eps) * mask


# ---- KL ------------------------------------------------------------------------------------------------------------
def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Per-token KL(pi || ref) estimate from sampled tokens (Schulman's estimators).

    k1 = logp - ref_logp (unbiased, can be negative: used in the reward); k3 = exp(ref - logp) - (ref - logp) - 1
    (unbiased, always >= 0, low variance: used as a loss).
    """
    if kind == "k1":
        return logp - ref_logp
    if kind == "k3":
        d = (ref_logp - logp).clamp(-20.0, 20.0)
        return torch.exp(d) - d - 1.0
    raise ValueError(f"unknown KL estimator {kind!r}; use k1 or k3")


def kl_in_reward(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, coef: float) -> torch.Tensor:
    """Token rewards (B, T): -coef * kl_t on every response token, plus the sequence score on its last token."""
    r = -coef * kl * mask
    last = (mask.sum(-1).long() - 1).clamp(min=0)  # (B,) index of each answer's last token
    r[torch.arange(r.shape[0]), last] += scores.float() * (mask.sum(-1) > 0).float()
    return r


# ---- importance sampling against the engine ------------------------------------------------------------------------
def truncated_is_weights(
    old_logp: torch.Tensor, rollout_logp: torch.Tensor, mask: torch.Tensor, cap: float
) -> tuple[torch.Tensor, dict[str, float]]:
    """Truncated importance weights w_t = min(exp(old_logp - rollout_logp), cap) (B, T), no gradient.

    vLLM sampled the tokens with its own numerics; the learner's probabilities differ a little (the "mismatch").
    ``cap <= 0`` turns the correction off (weights 1). Also returns mismatch stats: ``mismatch_kl`` (k3 of the
    engine against the learner, token mean), ``is_weight_mean``, ``is_clip_frac`` (share of tokens capped).
    """
    with torch.no_grad():
        log_ratio = (old_logp - rollout_logp).clamp(-20.0, 20.0)
        ratio = torch.exp(log_ratio)
        w = ratio.clamp(max=cap) if cap > 0 else torch.ones_like(ratio)
        stats = {
            "mismatch_kl": float(masked_mean(kl_estimate(rollout_logp, old_logp, "k3"), mask)),
            "is_weight_mean": float(masked_mean(w, mask)),
            "is_clip_frac": float(masked_mean((ratio > cap).float(), mask)) if cap > 0 else 0.0,
        }
    return w * mask, stats


# ---- policy / value losses -----------------------------------------------------------------------------------------
@register_policy_loss("clip")
def clipped_surrogate(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    is_weights: torch.Tensor | None = None,
    agg: str = "token-mean",
    n_tokens: float | None = None,
    n_seqs: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO's clipped surrogate with asymmetric clipping (DAPO's clip-higher): per token
    -min(r A, clip(r, 1 - eps_low, 1 + eps_high) A), r = exp(logp - old_logp), times the truncated IS weight.

    Returns (loss, {"clip_frac": share of tokens where the clipped term was chosen, "approx_kl": k3(old || new)}).
    """
    ratio = torch.exp((logp - old_logp).clamp(-20.0, 20.0))
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
    per_token = torch.maximum(unclipped, clipped)
    if is_weights is not None:
        per_token = per_token * is_weights
    loss = agg_loss(per_token, mask, agg, n_tokens, n_seqs)
    with torch.no_grad():
        stats = {
            "clip_frac": float(masked_mean((clipped > unclipped).float(), mask)),
            "approx_kl": float(masked_mean(kl_estimate(old_logp, logp.detach(), "k3"), mask)),
        }
    return loss, stats


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip: float = 0.2,
    agg: str = "token-mean",
    n_tokens: float | None = None,
    n_seqs: float | None = None,
) -> torch.Tensor:
    """PPO's clipped value loss: 0.5 * max((V - R)^2, (clip(V, V_old +- clip) - R)^2), aggregated."""
    v_clipped = old_values + (values - old_values).clamp(-clip, clip)
    per_token = 0.5 * torch.maximum((values - returns) ** 2, (v_clipped - returns) ** 2)
    return agg_loss(per_token, mask, agg, n_tokens, n_seqs)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """(..., V) logits -> (...) entropy of the softmax."""
    logp = torch.log_softmax(logits.float(), -1)
    return -(logp.exp() * logp).sum(-1)

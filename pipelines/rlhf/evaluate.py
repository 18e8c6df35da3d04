"""``evaluate_policy``: how good a policy is on held-out prompts (the demo's SFT-vs-RLHF summary).

- judge pass rate: the share of answers the code judge (``pipelines/judge.py``) scores 1.0 (the requested function,
  with the requested signature, not a trivial body); also the judge's mean score;
- mean reward-model score (when a reward model is given);
- KL to a reference checkpoint (e.g. the SFT model): the exact per-token KL(policy || reference) over the full
  vocabulary at every answer position, averaged over answer tokens (the answers are the policy's own);
- with ``reward`` (a ``--reward`` spec of ``fn:`` parts, e.g. ``fn:exact_answer,fn:number_answer``, reading the
  rows' columns as in training): each part's mean with a 95% interval, and for a 0/1 part its pass rate with a 95%
  interval.

The intervals (``mean_interval``, ``wilson_interval``): a mean is ``mean +- 1.96 sd / sqrt(n)`` with ``sd`` the
sample standard deviation (n - 1) over the per-prompt scores (the mean of a prompt's answers when sampling several,
so answers to one prompt do not count as independent; lm-evaluation-harness's ``mean_stderr``); a pass rate of a 0/1
part is Wilson's score interval over the answers, which stays inside [0, 1] and is not empty at 0% or 100% (where the
normal interval collapses to a point).

Answers are decoded greedily by default (``temperature=0``; the result says which), or sampled, ``samples`` answers
per prompt at ``temperature`` (rates are then over every answer: a finer measure than one greedy answer per prompt),
with the policy in a vLLM engine in its own Ray actor (freed afterwards). The answers and their scores come back in
``answers`` (the first ``keep_answers``) for a person to read.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import torch

log = logging.getLogger(__name__)

Z95 = 1.96  # the normal quantile of a two-sided 95% interval


def mean_interval(xs: Sequence[float], z: float = Z95) -> tuple[float, float, float]:
    """(mean, lo, hi): ``mean +- z * sd / sqrt(n)``, ``sd`` with n - 1 (lm-eval-harness ``mean_stderr``); fewer
    than two values: no spread to measure, lo and hi are NaN."""
    n = len(xs)
    if n == 0:
        return math.nan, math.nan, math.nan
    m = sum(xs) / n
    if n < 2:
        return m, math.nan, math.nan
    half = z * math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1)) / math.sqrt(n)
    return m, m - half, m + half


def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float, float, float]:
    """(k / n, lo, hi): Wilson's score interval for a binomial proportion,
    ``(p + z^2/2n +- z sqrt(p(1-p)/n + z^2/4n^2)) / (1 + z^2/n)``."""
    if n == 0:
        return math.nan, math.nan, math.nan
    p = k / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return p, max(0.0, center - half), min(1.0, center + half)


def summarize_scores(scores: Sequence[float], samples: int = 1) -> dict[str, Any]:
    """One reward part's summary over answers laid out prompt-major (``samples`` per prompt): ``mean`` with
    ``mean_lo``/``mean_hi`` (over per-prompt means), and for 0/1 scores ``pass_rate`` with ``pass_lo``/``pass_hi``
    (Wilson, over answers)."""
    per_prompt = [sum(scores[i : i + samples]) / samples for i in range(0, len(scores), samples)]
    m, lo, hi = mean_interval(per_prompt)
    out: dict[str, Any] = {"mean": m, "mean_lo": lo, "mean_hi": hi, "answers": len(scores), "binary": False}
    if scores and all(s in (0.0, 1.0) for s in scores):
        p, plo, phi = wilson_interval(int(sum(scores)), len(scores))
        out.update(binary=True, pass_rate=p, pass_lo=plo, pass_hi=phi)
    return out


@dataclass
class PolicyEval:
    policy: str
    prompts: int
    decoding: str  # "greedy" | "sampled (temperature T, seed S)"
    judge_pass_rate: float | None  # None: no prompt is a code-writing request (the judge has nothing to check)
    judge_mean: float | None
    answer_tokens_mean: float
    rm_score_mean: float | None = None
    kl_to_reference: float | None = None
    samples_per_prompt: int = 1
    answers: list[dict[str, Any]] | None = None  # [{prompt, answer, judge[, reward]}], the first keep_answers
    # with a reward spec: {part name (and "reward" for the weighted total of several parts): summarize_scores(...)}
    rewards: dict[str, dict[str, Any]] | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@torch.no_grad()
def kl_to_reference(
    policy: str,
    reference: str,
    prompt_ids: list[list[int]],
    answers: list[list[int]],
    pad_id: int,
    micro_batch_size: int = 8,
) -> float:
    """Mean over answer tokens of KL(policy || reference), exact over the vocabulary."""
    from models.checkpoint import load_checkpoint
    from pipelines.rlhf.learner import collate, response_logits

    pol, _ = load_checkpoint(policy)
    ref, _ = load_checkpoint(reference)
    if pol.cfg.vocab_size != ref.cfg.vocab_size:
        raise ValueError(
            f"reference {reference} has vocab {ref.cfg.vocab_size}, the policy {pol.cfg.vocab_size}: "
            "KL needs the same tokenizer"
        )
    pol.eval()
    ref.eval()
    total, count = 0.0, 0.0
    for lo in range(0, len(prompt_ids), micro_batch_size):
        keep = [i for i in range(lo, min(lo + micro_batch_size, len(prompt_ids))) if answers[i]]
        if not keep:
            continue
        mb = collate([prompt_ids[i] for i in keep], [answers[i] for i in keep], pad_id, torch.device("cpu"))
        lp = torch.log_softmax(response_logits(pol, mb).float(), -1)  # (m, T, V)
        lq = torch.log_softmax(response_logits(ref, mb).float(), -1)
        kl = (lp.exp() * (lp - lq)).sum(-1)  # (m, T)
        total += float((kl * mb.mask).sum())
        count += float(mb.mask.sum())
    return total / max(count, 1.0)


def evaluate_policy(
    policy: str,
    prompts: str,
    reference: str | None = None,
    reward_model: str | None = None,
    n_prompts: int = 32,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    seed: int = 0,
    engine_cfg=None,
    num_cpus: float = 1.0,
    samples: int = 1,
    keep_answers: int = 16,
    reward: str | None = None,
) -> PolicyEval:
    """Judge pass rate, mean reward-model score, KL to ``reference`` and (``reward``: a spec of ``fn:`` parts) each
    reward part's mean and pass rate with 95% intervals, of ``policy``'s answers to ``n_prompts`` prompts of
    ``prompts`` (a JSONL file or folder; pass a held-out split) in a seeded order; with ``temperature > 0``,
    ``samples`` answers per prompt. Needs a running Ray (the engine runs in an actor)."""
    import ray

    from models.chat import ChatFormat
    from models.checkpoint import load_config, load_tokenizer
    from models.engine import EngineConfig
    from pipelines.artifacts import checkpoint_dir
    from pipelines.judge import judge, requested_signature
    from pipelines.rewards import RewardModelWorker, function_rewards
    from pipelines.rlhf.experience import load_prompts, prompt_order
    from pipelines.rlhf.rollout import RolloutWorker, SamplingConfig

    policy = checkpoint_dir(policy)
    tok = load_tokenizer(policy)
    context = load_config(policy).max_seq_len
    ps = load_prompts(prompts, tok, ChatFormat.from_checkpoint(policy), context - max_new_tokens, tasks=["write"])
    order = prompt_order(len(ps), 0, min(n_prompts, len(ps)), seed)
    if samples < 1 or (temperature <= 0 and samples != 1):
        raise ValueError(
            f"samples={samples}: greedy decoding gives one answer per prompt; pass samples >= 1 with temperature > 0"
        )
    rewards = function_rewards(reward)
    if rewards is not None:  # a column a reward function needs: refused before the engine starts
        rewards.check_columns(ps.columns_for(order), len(order), source=f"--prompts {prompts}")
    ids = [ps.ids[i] for i in order]
    texts = [ps.texts[i] for i in order]
    stop = [tok.eot_id, tok.im_end_id]
    # the engine in the actor's own process, on every core of this machine: eval runs one policy at a time and the
    # driver waits (vLLM's spawned CPU engine binds one OpenMP thread per reserved CPU: 1 here)
    threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    actor = (
        ray.remote(RolloutWorker)
        .options(num_cpus=num_cpus)
        .remote(policy, engine_cfg or EngineConfig(max_num_seqs=64, cpu_threads=threads), stop, own_process=True)
    )
    try:
        if temperature <= 0:
            answers = ray.get(actor.greedy.remote(ids, max_new_tokens))
            decoding = "greedy"
        else:
            sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature)
            outs = ray.get(actor.generate.remote(ids, samples, sampling, [seed + i for i in range(len(ids))]))
            answers = [o.token_ids for group in outs for o in group]  # prompt-major: samples per prompt
            ids = [p for p in ids for _ in range(samples)]
            texts = [t for t in texts for _ in range(samples)]
            decoding = f"sampled ({samples} per prompt, temperature {temperature}, seed {seed})"
    finally:
        ray.kill(actor)
    specials = set(tok.special_tokens.values())
    answer_texts = [tok.decode([t for t in a if t not in specials]) for a in answers]
    # the code judge reads the function a prompt asks for: on other prompts (arithmetic, questions) it has no verdict
    judged = any(requested_signature(t) is not None for t in texts)
    scores: list[float | None] = [judge(p, a) if judged else None for p, a in zip(texts, answer_texts)]
    n = max(len(scores), 1)
    known = [s for s in scores if s is not None]
    result = PolicyEval(
        policy=policy,
        prompts=len(scores) // samples,
        decoding=decoding,
        judge_pass_rate=sum(s == 1.0 for s in known) / n if judged else None,
        judge_mean=sum(known) / n if judged else None,
        answer_tokens_mean=sum(len(a) for a in answers) / n,
        samples_per_prompt=samples,
        answers=[
            {"prompt": p, "answer": a, "judge": s} for p, a, s in list(zip(texts, answer_texts, scores))[:keep_answers]
        ],
    )
    if rewards is not None:
        total, parts = rewards.score(texts, answer_texts, None, ps.columns_for(order, samples))
        result.rewards = {name: summarize_scores(v, samples) for name, v in parts.items()}
        if len(parts) > 1:
            result.rewards["reward"] = summarize_scores(total, samples)
        for a, t in zip(result.answers or [], total):
            a["reward"] = t
    if reward_model:
        rm = RewardModelWorker(checkpoint_dir(reward_model), tok.pad_id)
        rm_scores = rm.score(ids, answers)
        result.rm_score_mean = sum(rm_scores) / max(len(rm_scores), 1)
    if reference and os.path.realpath(checkpoint_dir(reference)) == os.path.realpath(policy):
        result.kl_to_reference = 0.0  # the policy is its own reference: KL 0 by definition, no forward passes
    elif reference:
        result.kl_to_reference = kl_to_reference(policy, checkpoint_dir(reference), ids, answers, tok.pad_id)
    log.info(
        "evaluate_policy %s: judge pass %s (mean %s), rm %s, KL %s, rewards %s over %d answers (%s)",
        policy,
        result.judge_pass_rate,
        result.judge_mean,
        result.rm_score_mean,
        result.kl_to_reference,
        {k: round(v["mean"], 4) for k, v in (result.rewards or {}).items()},
        len(scores),
        decoding,
    )
    return result


def _pct(p: float, lo: float, hi: float) -> str:
    return f"{p:.1%} [{lo:.1%}, {hi:.1%}]"


def _num(m: float, lo: float, hi: float) -> str:
    return f"{m:.3f}" if math.isnan(lo) else f"{m:.3f} [{lo:.3f}, {hi:.3f}]"


def _or_dash(x: float | None, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def comparison_table(names: Sequence[str], rows: Sequence[dict[str, Any]]) -> str:
    """Policies side by side (one column each; ``rows``: ``PolicyEval.as_dict()``): every reward part (pass rate
    for 0/1 parts, else mean, with its 95% interval), the judge, the reward model, the KL, the decoding."""
    lines: list[tuple[str, list[str]]] = []
    parts = [k for k in (rows[0].get("rewards") or {})] if rows else []
    for part in parts:
        cells = [r["rewards"][part] for r in rows]
        if all(c["binary"] for c in cells):
            lines.append(
                (f"{part}: pass rate (95% CI)", [_pct(c["pass_rate"], c["pass_lo"], c["pass_hi"]) for c in cells])
            )
        else:
            lines.append((f"{part}: mean (95% CI)", [_num(c["mean"], c["mean_lo"], c["mean_hi"]) for c in cells]))
    if any(r.get("judge_pass_rate") is not None for r in rows):  # code-writing prompts: the judge's verdicts
        lines.append(("judge pass rate", [_or_dash(r.get("judge_pass_rate"), ".1%") for r in rows]))
        lines.append(("judge mean", [_or_dash(r.get("judge_mean"), ".3f") for r in rows]))
    if any(r.get("rm_score_mean") is not None for r in rows):
        lines.append(
            ("reward model score", ["-" if r["rm_score_mean"] is None else f"{r['rm_score_mean']:.3f}" for r in rows])
        )
    if any(r.get("kl_to_reference") is not None for r in rows):
        lines.append(
            ("KL to reference", ["-" if r["kl_to_reference"] is None else f"{r['kl_to_reference']:.4f}" for r in rows])
        )
    lines.append(("answer tokens (mean)", [f"{r['answer_tokens_mean']:.1f}" for r in rows]))
    lines.append(("prompts x answers", [f"{r['prompts']} x {r['samples_per_prompt']}" for r in rows]))
    lines.append(("decoding", [str(r["decoding"]).split(" (")[0] for r in rows]))
    head = max(len(label) for label, _ in lines)
    widths = [max([len(n)] + [len(cells[i]) for _, cells in lines]) for i, n in enumerate(names)]
    out = [" " * head + "  " + "  ".join(n.ljust(w) for n, w in zip(names, widths))]
    out += [label.ljust(head) + "  " + "  ".join(c.ljust(w) for c, w in zip(cells, widths)) for label, cells in lines]
    return "\n".join(line.rstrip() for line in out)

"""``evaluate_policy``: how good a policy is on held-out code-writing prompts (the demo's SFT-vs-RLHF summary).

- judge pass rate: the share of answers the code judge (``pipelines/judge.py``) scores 1.0 (the requested function,
  with the requested signature, not a trivial body); also the judge's mean score;
- mean reward-model score (when a reward model is given);
- KL to a reference checkpoint (e.g. the SFT model): the exact per-token KL(policy || reference) over the full
  vocabulary at every answer position, averaged over answer tokens (the answers are the policy's own).

Answers are decoded greedily by default (``temperature=0``; the result says which), or sampled, ``samples`` answers
per prompt at ``temperature`` (rates are then over every answer: a finer measure than one greedy answer per prompt),
with the policy in a vLLM engine in its own Ray actor (freed afterwards). The answers and their scores come back in
``answers`` (the first ``keep_answers``) for a person to read.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any

import torch

log = logging.getLogger(__name__)


@dataclass
class PolicyEval:
    policy: str
    prompts: int
    decoding: str  # "greedy" | "sampled (temperature T, seed S)"
    judge_pass_rate: float
    judge_mean: float
    answer_tokens_mean: float
    rm_score_mean: float | None = None
    kl_to_reference: float | None = None
    samples_per_prompt: int = 1
    answers: list[dict[str, Any]] | None = None  # [{prompt, answer, judge}], the first keep_answers

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@torch.no_grad()
def kl_to_reference(policy: str, reference: str, prompt_ids: list[list[int]], answers: list[list[int]],
                    pad_id: int, micro_batch_size: int = 8) -> float:
    """Mean over answer tokens of KL(policy || reference), exact over the vocabulary."""
    from models.checkpoint import load_checkpoint
    from pipelines.rlhf.learner import collate, response_logits

    pol, _ = load_checkpoint(policy)
    ref, _ = load_checkpoint(reference)
    if pol.cfg.vocab_size != ref.cfg.vocab_size:
        raise ValueError(f"reference {reference} has vocab {ref.cfg.vocab_size}, the policy {pol.cfg.vocab_size}: "
                         "KL needs the same tokenizer")
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


def evaluate_policy(policy: str, prompts: str, reference: str | None = None, reward_model: str | None = None,
                    n_prompts: int = 32, max_new_tokens: int = 128, temperature: float = 0.0, seed: int = 0,
                    engine_cfg=None, num_cpus: float = 1.0, samples: int = 1, keep_answers: int = 16) -> PolicyEval:
    """Judge pass rate, mean reward-model score and KL to ``reference`` of ``policy``'s answers to the first
    ``n_prompts`` code-writing prompts of ``prompts`` (an sft-data file or folder; use its held-out split); with
    ``temperature > 0``, ``samples`` answers per prompt. Needs a running Ray (the engine runs in an actor)."""
    import ray

    from models.chat import ChatFormat
    from models.checkpoint import load_config, load_tokenizer
    from models.engine import EngineConfig
    from pipelines.artifacts import checkpoint_dir
    from pipelines.judge import judge
    from pipelines.rlhf.experience import load_prompts, prompt_order
    from pipelines.rlhf.rewards import RewardModelWorker
    from pipelines.rlhf.rollout import RolloutWorker, SamplingConfig

    policy = checkpoint_dir(policy)
    tok = load_tokenizer(policy)
    context = load_config(policy).max_seq_len
    ps = load_prompts(prompts, tok, ChatFormat.from_checkpoint(policy), context - max_new_tokens, tasks=["write"])
    order = prompt_order(len(ps), 0, min(n_prompts, len(ps)), seed)
    if samples < 1 or (temperature <= 0 and samples != 1):
        raise ValueError(f"samples={samples}: greedy decoding gives one answer per prompt; pass samples >= 1 with "
                         "temperature > 0")
    ids = [ps.ids[i] for i in order]
    texts = [ps.texts[i] for i in order]
    stop = [tok.eot_id, tok.im_end_id]
    actor = ray.remote(RolloutWorker).options(num_cpus=num_cpus).remote(
        policy, engine_cfg or EngineConfig(max_num_seqs=32), stop)
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
    scores = [judge(p, a) for p, a in zip(texts, answer_texts)]
    n = max(len(scores), 1)
    result = PolicyEval(policy=policy, prompts=len(scores) // samples, decoding=decoding,
                        judge_pass_rate=sum(s == 1.0 for s in scores) / n, judge_mean=sum(scores) / n,
                        answer_tokens_mean=sum(len(a) for a in answers) / n, samples_per_prompt=samples,
                        answers=[{"prompt": p, "answer": a, "judge": s} for p, a, s in
                                 list(zip(texts, answer_texts, scores))[:keep_answers]])
    if reward_model:
        rm = RewardModelWorker(checkpoint_dir(reward_model), tok.pad_id)
        rm_scores = rm.score(ids, answers)
        result.rm_score_mean = sum(rm_scores) / max(len(rm_scores), 1)
    if reference:
        result.kl_to_reference = kl_to_reference(policy, checkpoint_dir(reference), ids, answers, tok.pad_id)
    log.info("evaluate_policy %s: judge pass %.3f (mean %.3f), rm %s, KL %s over %d answers (%s)", policy,
             result.judge_pass_rate, result.judge_mean, result.rm_score_mean, result.kl_to_reference, len(scores),
             decoding)
    return result

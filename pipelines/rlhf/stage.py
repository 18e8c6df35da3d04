"""``genloop rlhf``: GRPO or PPO on a policy checkpoint with vLLM rollout actors and a Ray Train learner.

::

    genloop rlhf --policy SFT_CKPT --reward RM_DIR[,fn:NAME[:W]...] --prompts SFT_DATA --algo grpo|ppo --out DIR

Each iteration is generate -> score -> learn -> sync (docs/ARCHITECTURE.md "Alignment (RLHF)"):

- generate: ``rollout.engines`` Ray actors (``rollout.RolloutWorker``), each one vLLM engine built with the weight-sync
  worker extension, sample ``rollout.group_size`` answers per prompt with token ids and log-probs;
- score: reward functions and/or a reward model in its own actor, weighted (``rewards.py``); every part logged;
- learn: ``train.num_workers`` Ray Train ranks (DDP | FSDP2, ``models.parallel.wrap_model``), frozen reference for KL,
  PPO's value model + GAE or GRPO's group advantages, clipped surrogate over ``epochs x minibatches`` steps, truncated
  importance sampling against vLLM's log-probs (``learner.py``);
- sync: rank 0 gathers the full state dict and reloads every engine in place (CPU: one safetensors file in /dev/shm;
  other nodes: Ray's object store). On a GPU cluster the engines ask one GPU each (``pipelines/resources.py``
  rollout_engine, gpu-1x nodes) and the learner ranks theirs (learner_worker, gpu-8x); the same reload path works, and
  vLLM's NCCL weight-transfer engine is the faster route there (its engines are CUDA-only in vLLM 0.32).

The artifact folder ``--out``::

    manifest.json                stage "rlhf": config, inputs (policy, prompts, reward model), counts, last metrics
    model/                       the final policy, a Hugging Face folder ``genloop serve`` serves as is
    metrics.jsonl, metrics.csv   one row per iteration: reward mean/std and per part, kl, entropy, response_len,
                                 clip_frac, mismatch_kl, is_clip_frac, rollout/learner tokens/s, sync_s,
                                 t_generate / t_score / t_learn / t_sync
    reward_curve.png
    train_runs/rlhf/step_*/      learner checkpoints (policy + optimizer [+ value model], loop state); re-running the
                                 same command resumes an unfinished run from the newest; ``--overwrite`` clears the
                                 artifact and starts afresh (``pipelines/lifecycle.py``)

``run(cfg)`` takes a ready Ray runtime (the command starts Ray); it never calls ``ray.init``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

from pipelines.lifecycle import absolute_paths, begin_stage
from pipelines.rewards import RewardError, RewardSet
from pipelines.rlhf.config import RlhfConfig
from pipelines.rlhf.experience import PromptSet, load_prompts
from pipelines.train.config import MODEL_DIR, RUNS_DIR
from pipelines.train.curves import curve_ends

log = logging.getLogger(__name__)

RUN_NAME = "rlhf"


@dataclass
class Plan:
    """Everything checked before any actor or worker starts."""

    policy: str  # local checkpoint folder
    tokenizer: str  # the policy's folder (its tokenizer files)
    prompts: PromptSet
    rewards: RewardSet
    reward_model: str | None
    value_init: str | None
    stop_ids: list[int] = field(default_factory=list)
    pad_id: int = 0


def plan(cfg: RlhfConfig) -> Plan:
    """Validate the config and inputs with one clear error each (tokenizer mismatch included)."""
    from models.chat import ChatFormat
    from models.checkpoint import load_config, load_tokenizer
    from models.tokenizer import tokenizers_match
    from pipelines.artifacts import checkpoint_dir

    cfg.validate()
    policy = checkpoint_dir(cfg.policy)
    tok = load_tokenizer(policy)
    mcfg = load_config(policy)
    context = cfg.rollout.engine.max_model_len or mcfg.max_seq_len
    max_prompt = cfg.max_prompt_tokens or context - cfg.rollout.sampling.max_new_tokens
    if max_prompt < 1 or max_prompt + cfg.rollout.sampling.max_new_tokens > context:
        raise ValueError(
            f"max_prompt_tokens={max_prompt} + rollout.sampling.max_new_tokens="
            f"{cfg.rollout.sampling.max_new_tokens} exceed the model's context {context}; lower them"
        )
    rewards = RewardSet.from_spec(cfg.reward)
    rm = None
    if rewards.reward_model is not None:
        rm = checkpoint_dir(rewards.reward_model.target)
        rm_tok = load_tokenizer(rm)
        if not tokenizers_match(rm_tok, tok):
            raise RewardError(
                f"reward model {rm} uses tokenizer {rm_tok.name!r} ({rm_tok.n_vocab} tokens) but the "
                f"policy {policy} uses {tok.name!r} ({tok.n_vocab} tokens); train the reward model from "
                "the policy's checkpoint (genloop reward --init-from)"
            )
    value_init = None
    if cfg.algo == "ppo":
        value_init = checkpoint_dir(cfg.value_init) if cfg.value_init else rm  # None: the policy's trunk
    prompts = load_prompts(cfg.prompts, tok, ChatFormat.from_checkpoint(policy), max_prompt, cfg.prompt_tasks)
    rewards.check_columns(prompts.columns, len(prompts))  # a column a reward function needs: refused before rollout
    dropped = {k: v for k, v in prompts.counts.items() if k not in ("lines", "kept") and v}
    if dropped:
        log.warning("rlhf: %d prompts kept, dropped %s", len(prompts), dropped)
    return Plan(policy, policy, prompts, rewards, rm, value_init, [tok.eot_id, tok.im_end_id], tok.pad_id)


def check_placement(cfg: RlhfConfig, use_gpu: bool, has_rm: bool) -> None:
    """Fail up front when the Ray cluster cannot hold the engines, the learner ranks and the reward model."""
    from pipelines.resources import check_placement as check

    check(
        "rlhf",
        [
            ("engines", cfg.rollout.engines, cfg.rollout.cpus_per_engine, 1),
            ("learner ranks", cfg.train.num_workers, cfg.train.cpus_per_worker, 1),
            ("reward model", int(has_rm), cfg.reward_model_cpus, 1),
        ],
        use_gpu,
        "lower rollout.engines or train.num_workers",
    )


@dataclass
class RlhfResult:
    out: str
    iterations: int
    metrics: dict[str, Any]  # the last iteration's row
    history: list[dict[str, Any]]
    model_dir: str


def start_engines(cfg: RlhfConfig, p: Plan, use_gpu: bool) -> list:
    """The rollout actors (one vLLM engine each)."""
    from pipelines.resources import ray_options
    from pipelines.rlhf.rollout import make_rollout_actors

    opts = {**ray_options("rollout_engine", use_gpu), "num_cpus": cfg.rollout.cpus_per_engine}
    return make_rollout_actors(
        cfg.rollout.engines, p.policy, cfg.rollout.engine, p.stop_ids, opts, cfg.rollout.max_restarts
    )


def start_reward_models(cfg: RlhfConfig, p: Plan, use_gpu: bool) -> list:
    import ray

    from pipelines.resources import ray_options
    from pipelines.rewards import RewardModelWorker

    if p.reward_model is None:
        return []
    opts = {**ray_options("reward_scorer", use_gpu), "num_cpus": cfg.reward_model_cpus}
    threads = max(1, int(cfg.reward_model_cpus))
    return [
        ray.remote(RewardModelWorker)
        .options(max_restarts=-1, **opts)
        .remote(p.reward_model, p.pad_id, cfg.train.micro_batch_size, threads)
    ]


def run(cfg: RlhfConfig, engines: list | None = None) -> RlhfResult:
    """Run (or resume) RLHF on the connected Ray runtime. ``engines``: already running rollout actors over the same
    policy checkpoint to use instead of starting new ones (tests and benches share them); the learner pushes its
    weights into them before the first generate."""
    from pipelines.rlhf.loop import learner_loop
    from pipelines.runtime import use_gpu_default
    from pipelines.train.loop import read_history, run_trainer

    cfg = absolute_paths(cfg, "policy", "prompts", "value_init", "out")
    p = plan(cfg)
    use_gpu = use_gpu_default() if cfg.train.use_gpu is None else cfg.train.use_gpu
    check_placement(cfg, use_gpu, p.reward_model is not None)
    artifact = begin_stage(
        "rlhf",
        cfg.out,
        cfg,
        inputs={
            "--policy": cfg.policy,
            "--prompts": cfg.prompts,
            "reward model": p.reward_model,
            "value_init": cfg.value_init,
        },
        overwrite=cfg.overwrite,
    )
    if engines is None:
        engines = start_engines(cfg, p, use_gpu)
    rm_actors = start_reward_models(cfg, p, use_gpu)
    args: dict[str, Any] = {
        "cfg": cfg,
        "policy": p.policy,
        "value_init": p.value_init,
        "engines": engines,
        "rm_actors": rm_actors,
        "prompts": p.prompts,
        "tokenizer": p.tokenizer,
        "out": cfg.out,
    }
    run_trainer(learner_loop, args, cfg.train, os.path.join(cfg.out, RUNS_DIR), RUN_NAME, use_gpu)
    history = read_history(cfg.out)
    last = history[-1] if history else {}
    artifact.finish(
        counts={
            "iterations": len(history),
            "prompts": len(p.prompts),
            **{f"prompts_{k}": v for k, v in p.prompts.counts.items() if k != "kept"},
        },
        metrics=curve_summary(history),
    )
    return RlhfResult(cfg.out, len(history), last, history, os.path.join(cfg.out, MODEL_DIR))


def curve_summary(history: list[dict[str, Any]]) -> dict[str, Any]:
    """The reward and KL curves' two ends with their spread (mean and sd of the first and last k iterations, k up to
    5), never two single endpoints of a noisy curve; plus the last sync time."""
    out: dict[str, Any] = {"sync_s_last": history[-1].get("sync_s") if history else None}
    for key in ("reward_mean", "kl"):
        ends = curve_ends(history, key, x="iteration")
        if ends is not None:
            out.update(
                {
                    f"{key}_k": ends.k,
                    f"{key}_first": ends.first[0],
                    f"{key}_first_sd": ends.first[1],
                    f"{key}_last": ends.last[0],
                    f"{key}_last_sd": ends.last[1],
                }
            )
    return out

"""``genloop rlhf``: GRPO or PPO on a policy checkpoint with vLLM rollout actors and a Ray Train learner.

::

    genloop rlhf --policy SFT_CKPT --reward RM_DIR[,fn:NAME[:W]...] --prompts SFT_DATA --algo grpo|ppo --out DIR

Each iteration is generate -> score -> learn -> sync (ARCHITECTURE.md "Alignment (RLHF)"):

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
                                 same command resumes from the newest

``run(cfg)`` takes a ready Ray runtime (the command starts Ray); it never calls ``ray.init``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field
from typing import Any

from pipelines.artifacts import Manifest, absolute, is_finished
from pipelines.rlhf.config import RlhfConfig
from pipelines.rlhf.experience import PromptSet, load_prompts
from pipelines.rlhf.rewards import RewardError, RewardSet
from pipelines.train.config import MODEL_DIR, RUNS_DIR

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
    from pipelines.artifacts import checkpoint_dir
    from models.tokenizer import tokenizers_match

    cfg.validate()
    policy = checkpoint_dir(cfg.policy)
    tok = load_tokenizer(policy)
    mcfg = load_config(policy)
    context = cfg.rollout.engine.max_model_len or mcfg.max_seq_len
    max_prompt = cfg.max_prompt_tokens or context - cfg.rollout.sampling.max_new_tokens
    if max_prompt < 1 or max_prompt + cfg.rollout.sampling.max_new_tokens > context:
        raise ValueError(f"max_prompt_tokens={max_prompt} + rollout.sampling.max_new_tokens="
                         f"{cfg.rollout.sampling.max_new_tokens} exceed the model's context {context}; lower them")
    rewards = RewardSet.from_spec(cfg.reward)
    rm = None
    if rewards.reward_model is not None:
        rm = checkpoint_dir(rewards.reward_model.target)
        rm_tok = load_tokenizer(rm)
        if not tokenizers_match(rm_tok, tok):
            raise RewardError(f"reward model {rm} uses tokenizer {rm_tok.name!r} ({rm_tok.n_vocab} tokens) but the "
                              f"policy {policy} uses {tok.name!r} ({tok.n_vocab} tokens); train the reward model from "
                              "the policy's checkpoint (genloop reward --init-from)")
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
    import ray

    res = ray.cluster_resources()
    need = cfg.rollout.engines * cfg.rollout.cpus_per_engine + cfg.train.num_workers * cfg.train.cpus_per_worker \
        + (cfg.reward_model_cpus if has_rm else 0)
    if res.get("CPU", 0) < need:
        raise ValueError(f"rlhf needs {need:g} CPUs ({cfg.rollout.engines} engines x {cfg.rollout.cpus_per_engine:g} + "
                         f"{cfg.train.num_workers} learner ranks x {cfg.train.cpus_per_worker}"
                         f"{f' + reward model {cfg.reward_model_cpus:g}' if has_rm else ''}) but the Ray cluster has "
                         f"{res.get('CPU', 0):g}; lower rollout.engines or train.num_workers")
    if use_gpu:
        gpus = cfg.rollout.engines + cfg.train.num_workers + (1 if has_rm else 0)
        if res.get("GPU", 0) < gpus:
            raise ValueError(f"rlhf on GPUs needs {gpus} GPUs (engines + learner ranks + reward model) but the "
                             f"cluster has {res.get('GPU', 0):g}; lower them or set train.use_gpu=false")


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
    return make_rollout_actors(cfg.rollout.engines, p.policy, cfg.rollout.engine, p.stop_ids, opts,
                               cfg.rollout.max_restarts)


def start_reward_models(cfg: RlhfConfig, p: Plan, use_gpu: bool) -> list:
    import ray

    from pipelines.resources import ray_options
    from pipelines.rlhf.rewards import RewardModelWorker

    if p.reward_model is None:
        return []
    opts = {**ray_options("reward_scorer", use_gpu), "num_cpus": cfg.reward_model_cpus}
    threads = max(1, int(cfg.reward_model_cpus))
    return [ray.remote(RewardModelWorker).options(max_restarts=-1, **opts).remote(
        p.reward_model, p.pad_id, cfg.train.micro_batch_size, threads)]


def run(cfg: RlhfConfig, engines: list | None = None) -> RlhfResult:
    """Run (or resume) RLHF on the connected Ray runtime. ``engines``: already running rollout actors over the same
    policy checkpoint to use instead of starting new ones (tests and benches share them); the learner pushes its
    weights into them before the first generate."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipelines.runtime import use_gpu_default
    from pipelines.train.session import latest_checkpoint_dir

    cfg = dataclasses.replace(cfg, policy=absolute(cfg.policy), out=absolute(cfg.out), prompts=absolute(cfg.prompts),
                              value_init=absolute(cfg.value_init) if cfg.value_init else "")
    p = plan(cfg)
    use_gpu = use_gpu_default() if cfg.train.use_gpu is None else cfg.train.use_gpu
    check_placement(cfg, use_gpu, p.reward_model is not None)
    if cfg.overwrite and is_finished(cfg.out):
        _clear_previous(cfg.out)
    inputs = [cfg.policy, cfg.prompts] + ([p.reward_model] if p.reward_model else [])
    manifest = Manifest.begin("rlhf", cfg.out, cfg, inputs=inputs, overwrite=cfg.overwrite)
    os.makedirs(cfg.out, exist_ok=True)
    if engines is None:
        engines = start_engines(cfg, p, use_gpu)
    rm_actors = start_reward_models(cfg, p, use_gpu)
    run_dir = os.path.join(cfg.out, RUNS_DIR)
    os.makedirs(run_dir, exist_ok=True)
    args: dict[str, Any] = {"cfg": cfg, "policy": p.policy, "value_init": p.value_init, "engines": engines,
                            "rm_actors": rm_actors, "prompts": p.prompts, "tokenizer": p.tokenizer, "out": cfg.out}
    latest = latest_checkpoint_dir(os.path.join(run_dir, RUN_NAME))
    if latest:
        log.info("rlhf: resuming from %s (re-run)", latest)
        args["resume_dir"] = latest
    from pipelines.rlhf.loop import learner_loop

    trainer = TorchTrainer(
        learner_loop, train_loop_config=args,
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=cfg.train.num_workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": cfg.train.cpus_per_worker}),
        run_config=RunConfig(name=RUN_NAME, storage_path=run_dir,
                             failure_config=FailureConfig(max_failures=cfg.train.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=max(1, cfg.train.keep_checkpoints))),
    )
    result = trainer.fit()
    if result.error:
        raise result.error
    from pipelines.rlhf.stage_io import read_history

    history = read_history(cfg.out)
    last = history[-1] if history else {}
    first = history[0] if history else {}
    manifest.finish(counts={"iterations": len(history), "prompts": len(p.prompts), **{
        f"prompts_{k}": v for k, v in p.prompts.counts.items() if k != "kept"}},
        metrics={"reward_first": first.get("reward_mean"), "reward_last": last.get("reward_mean"),
                 "kl_last": last.get("kl"), "sync_s_last": last.get("sync_s")})
    return RlhfResult(cfg.out, len(history), last, history, os.path.join(cfg.out, MODEL_DIR))


def _clear_previous(out: str) -> None:
    import shutil

    for name in (RUNS_DIR, MODEL_DIR, ".faults"):
        shutil.rmtree(os.path.join(out, name), ignore_errors=True)
    for name in ("metrics.jsonl", "metrics.csv", "reward_curve.png"):
        if os.path.exists(os.path.join(out, name)):
            os.unlink(os.path.join(out, name))

"""Typed configuration of ``genloop rlhf`` (the ``rlhf:`` section of a preset, plus ``key=value`` overrides)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from models.engine import EngineConfig
from pipelines.rlhf.rollout import SamplingConfig


@dataclass
class RolloutConfig:
    """Generation: ``engines`` vLLM actors; each iteration samples ``group_size`` answers to ``prompts_per_iter``
    prompts (split over the engines)."""

    engines: int = 1
    prompts_per_iter: int = 8
    group_size: int = 4
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)  # rollouts always use processed log-probs
    cpus_per_engine: float = 1.0
    # DAPO's dynamic sampling: sample prompts_per_iter x oversample prompts' groups, and train on prompts_per_iter of
    # them, groups whose update.filter_groups part (else the combined reward) differs first; 1: no over-sampling
    oversample: int = 1
    max_restarts: int = -1  # a dead engine actor is re-created by Ray (-1: always)
    inject_failure_at: int = 0  # fault injection: one engine actor exits once at this iteration


@dataclass
class KLConfig:
    """The pull towards the frozen reference (the starting policy). ``coef`` 0: no reference model at all."""

    coef: float = 0.0
    mode: Literal["loss", "reward"] = "loss"  # k3 as a loss term, or k1 subtracted from the token rewards
    estimator: Literal["k1", "k3"] = "k3"  # used in "loss" mode; "reward" mode always uses k1


@dataclass
class UpdateConfig:
    """How one iteration updates the policy: advantages, the clipped loss, epochs x minibatches (pipelines/rlhf/algos.py)."""

    norm_std: bool = True  # grpo: divide by the group's std (False: Dr.GRPO)
    # grpo: a reward part's name (e.g. judge_pass): groups where that part is the same for every answer get no
    # policy-gradient update (DAPO's dynamic sampling, without refilling the batch); "" keeps every group
    filter_groups: str = ""
    # grpo: scale of negative advantages (below-group-mean answers). 1.0 is GRPO; < 1 leans on the answers that did
    # better than their group (positive-sample reinforcement sharpens the policy towards them: greedy pass@1),
    # > 1 on pushing down the worse ones (keeps entropy: pass@k). Zhu et al. 2025, "The Surprising Effectiveness
    # of Negative Reinforcement in LLM Reasoning" (W-REINFORCE) decompose the objective the same way.
    negative_weight: float = 1.0
    eps_low: float = 0.2
    eps_high: float = 0.2
    epochs: int = 1  # passes over each iteration's batch
    minibatches: int = 1  # optimizer steps per epoch
    loss_agg: Literal["token-mean", "seq-mean-token-mean"] = "token-mean"
    is_cap: float = 2.0  # truncated importance sampling cap on exp(learner - vLLM log-probs); 0 = off
    # the log-probs the clipped ratio divides by. "learner": the policy's own, before the iteration's first step (a
    # no-grad pass, skipped at 1 epoch x 1 minibatch of GRPO), the engine/learner gap corrected by truncated IS.
    # "rollout": the engine's sampling log-probs (the behaviour policy itself; veRL's bypass mode): no extra pass at
    # any epochs x minibatches; sound when the engine computes what the learner does (fp32: mismatch_kl ~1e-9 here),
    # not with a bf16 engine under an fp32 learner
    old_logp: Literal["learner", "rollout"] = "learner"
    entropy_coef: float = 0.0
    gamma: float = 1.0  # ppo: GAE discount
    lam: float = 0.95  # ppo: GAE lambda
    value_clip: float = 0.2  # ppo
    vf_lr: float = 0.0  # ppo: value model learning rate (0: learner.lr)
    whiten_advantages: bool = True  # ppo: normalise GAE advantages over the batch


@dataclass
class LearnerConfig:
    """The Ray Train learner group (DDP | FSDP2 as pretraining) and its optimizer."""

    num_workers: int = 1
    strategy: Literal["ddp", "fsdp", "none"] = "ddp"
    cpus_per_worker: int = 1
    # CPU: torch threads per learner rank (0: cpus_per_worker). Generation, scoring and learning take turns, so on
    # one node the learner may also use the cores the engines and reward models hold while they wait (colocated,
    # as veRL time-shares GPUs): node CPUs / learner ranks
    threads: int = 0
    use_gpu: bool | None = None  # None: GPUs if the cluster has them
    micro_batch_size: int = 8  # samples per forward/backward on one rank
    autocast: Literal["none", "bf16"] = "none"  # bf16: bfloat16 autocast forward passes (models.parallel.autocast)
    lr: float = 1e-5
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0
    ckpt_every: int = 10  # iterations between checkpoints (0: only at the end)
    keep_checkpoints: int = 2
    max_failures: int = 3  # restarts from the last checkpoint (a dead learner rank or rollout engine)
    inject_failure_at: int = 0  # fault injection: the last learner rank exits once at this iteration


@dataclass
class RlhfConfig:
    policy: str = ""  # the starting policy: an SFT checkpoint (or an artifact folder holding model/)
    reward: str = ""  # RM_DIR[,fn:NAME[:W]][,fn:file.py:func[:W]] (pipelines/rewards.py)
    prompts: str = ""  # JSONL prompt rows (sft-data or `genloop tasks` output): a file or a folder with train.jsonl
    out: str = ""
    algo: Literal["grpo", "ppo"] = "grpo"
    value_init: str = ""  # ppo: the value model's starting backbone (default: a reward model part, else the policy)
    iterations: int = 10
    seed: int = 0
    max_prompt_tokens: int = 0  # 0: the engine's context minus sampling.max_new_tokens; longer prompts are dropped
    prompt_tasks: list[str] = field(default_factory=lambda: ["write"])  # sft-data meta.task kinds to use ([]: all)
    reward_model_cpus: float = 1.0  # the reward-model actor's CPUs
    overwrite: bool = False
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    update: UpdateConfig = field(default_factory=UpdateConfig)
    kl: KLConfig = field(default_factory=KLConfig)
    train: LearnerConfig = field(default_factory=LearnerConfig)

    def batch_size(self) -> int:
        return self.rollout.prompts_per_iter * self.rollout.group_size

    def validate(self) -> None:
        if not self.policy:
            raise ValueError("no --policy: pass the SFT checkpoint to start from")
        if not self.prompts:
            raise ValueError("no --prompts: pass a JSONL file of prompt rows or a folder with train.jsonl")
        if not self.out:
            raise ValueError("no --out: pass the folder to write the policy and metrics to")
        if not self.reward:
            raise ValueError("no --reward: pass a reward model folder and/or fn:NAME (e.g. fn:code_judge)")
        if self.algo not in ("grpo", "ppo"):
            raise ValueError(f"algo={self.algo!r}: use grpo or ppo")
        r, a, t = self.rollout, self.update, self.train
        if t.autocast not in ("none", "bf16"):
            raise ValueError(f"train.autocast={t.autocast!r}: use none or bf16")
        for key, v in (
            ("iterations", self.iterations),
            ("rollout.engines", r.engines),
            ("rollout.prompts_per_iter", r.prompts_per_iter),
            ("rollout.group_size", r.group_size),
            ("update.epochs", a.epochs),
            ("update.minibatches", a.minibatches),
            ("train.num_workers", t.num_workers),
            ("rollout.oversample", r.oversample),
            ("train.micro_batch_size", t.micro_batch_size),
            ("rollout.sampling.max_new_tokens", r.sampling.max_new_tokens),
        ):
            if v < 1:
                raise ValueError(f"{key}={v} must be >= 1")
        if self.algo == "grpo" and r.group_size < 2:
            raise ValueError("grpo compares answers within a group: rollout.group_size must be >= 2")
        per = a.minibatches * t.num_workers
        if self.batch_size() % per:
            raise ValueError(
                f"a batch of {self.batch_size()} answers (prompts_per_iter x group_size) must split into "
                f"update.minibatches={a.minibatches} x train.num_workers={t.num_workers} equal parts; "
                "change prompts_per_iter or group_size"
            )
        if t.strategy == "none" and t.num_workers != 1:
            raise ValueError("train.strategy=none runs one process: set train.num_workers=1")
        if t.threads < 0:
            raise ValueError(f"train.threads={t.threads} must be >= 0 (0: train.cpus_per_worker)")
        if a.negative_weight < 0:
            raise ValueError(f"update.negative_weight={a.negative_weight} must be >= 0")
        if a.filter_groups:
            from pipelines.rewards import parse_reward_spec

            names = [p.name for p in parse_reward_spec(self.reward)]
            if self.algo != "grpo":
                raise ValueError("update.filter_groups filters GRPO's groups: use it with --algo grpo")
            if a.filter_groups not in names:
                raise ValueError(
                    f"update.filter_groups={a.filter_groups!r} is not a part of --reward "
                    f"({', '.join(names)}); name one of them"
                )
        if self.algo == "grpo" and self.kl.coef > 0 and self.kl.mode == "reward":
            raise ValueError("grpo takes the KL term as a loss (kl.mode=loss); kl.mode=reward is for ppo")
        if self.kl.mode not in ("loss", "reward") or self.kl.estimator not in ("k1", "k3"):
            raise ValueError(f"kl.mode={self.kl.mode!r} / kl.estimator={self.kl.estimator!r}: use loss|reward, k1|k3")
        if r.sampling.temperature <= 0:
            raise ValueError("rollout.sampling.temperature must be > 0: RL samples answers (greedy has no spread)")

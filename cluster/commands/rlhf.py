"""``genloop rlhf``: GRPO or PPO with vLLM rollout actors and a Ray Train learner (the stage:
``pipelines.rlhf.stage``)."""

from __future__ import annotations

import argparse
import json

from cluster.commands.base import add_stage_command, config_from_args, start_ray

HELP = "align a policy with GRPO or PPO: vLLM rollout actors, reward model / functions, Ray Train learner"


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    return add_stage_command(
        sub,
        "rlhf",
        HELP,
        flags={
            "--policy": (
                "policy",
                {"metavar": "CKPT", "help": "the starting policy (SFT checkpoint or artifact folder)"},
            ),
            "--reward": (
                "reward",
                {
                    "metavar": "SPEC",
                    "help": "comma-separated parts, each [rm:]RM_DIR[:W] | fn:NAME[:W] | "
                    "fn:path/file.py:func[:W] (built-ins: code_judge, writes_function, "
                    "exact_answer, number_answer)",
                },
            ),
            "--prompts": (
                "prompts",
                {
                    "metavar": "FILE_OR_DIR",
                    "help": 'JSONL rows {"prompt": ...} or {"messages": [...]}, other fields passed to '
                    "reward functions (sft-data or `genloop tasks` output)",
                },
            ),
            "--algo": ("algo", {"choices": ["grpo", "ppo"], "help": "grpo: group advantages; ppo: value model + GAE"}),
            "--out": (
                "out",
                {"metavar": "DIR", "help": "artifact folder (model/ is the final policy, servable as is)"},
            ),
            "--iterations": ("iterations", {"metavar": "N", "type": int, "help": "generate -> score -> learn -> sync"}),
            "--engines": ("rollout.engines", {"metavar": "N", "type": int, "help": "vLLM rollout actors"}),
            "--num-workers": ("train.num_workers", {"metavar": "N", "type": int, "help": "learner ranks (Ray Train)"}),
        },
        examples="rollout.group_size=8 kl.coef=0.05 update.eps_high=0.28 update.norm_std=false train.strategy=fsdp",
    )


def config(args: argparse.Namespace):
    from pipelines.rlhf.config import RlhfConfig

    return config_from_args(RlhfConfig, "rlhf", args)


def run(args: argparse.Namespace) -> int:
    from pipelines.lifecycle import check_out
    from pipelines.rlhf.stage import curve_summary, plan
    from pipelines.rlhf.stage import run as run_stage

    cfg = config(args)
    plan(cfg)  # bad inputs (missing files, tokenizer mismatch, bad reward spec) fail before Ray starts
    check_out("rlhf", cfg.out, cfg.overwrite)  # a finished or foreign --out fails before Ray starts
    start_ray(args)
    res = run_stage(cfg)
    ends = curve_summary(res.history)  # mean +- sd of the first and last k iterations, never two endpoints
    nan = float("nan")
    print(
        f"rlhf ({cfg.algo}): {res.iterations} iterations; reward mean, first {ends.get('reward_mean_k', 0)} "
        f"iterations {ends.get('reward_mean_first', nan):.3f} ± {ends.get('reward_mean_first_sd', nan):.3f}, last "
        f"{ends.get('reward_mean_last', nan):.3f} ± {ends.get('reward_mean_last_sd', nan):.3f}; KL, last "
        f"{ends.get('kl_last', nan):.4f} ± {ends.get('kl_last_sd', nan):.4f}; sync "
        f"{res.metrics.get('sync_s', 0.0):.2f} s/iteration; policy: {res.model_dir}"
    )
    print(
        json.dumps({"out": res.out, "model": res.model_dir, "iterations": res.iterations, **ends})
    )  # the last line: machine-readable
    return 0

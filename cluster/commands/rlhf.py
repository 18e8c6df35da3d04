"""``genloop rlhf``: GRPO or PPO with vLLM rollout actors and a Ray Train learner (the stage: ``pipelines.rlhf``)."""

from __future__ import annotations

import argparse
import json

from cluster.commands.base import add_stage_command, config_from_args, start_ray

HELP = "align a policy with GRPO or PPO: vLLM rollout actors, reward model / functions, Ray Train learner"


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    return add_stage_command(sub, "rlhf", HELP, flags={
        "--policy": ("policy", {"metavar": "CKPT", "help": "the starting policy (SFT checkpoint or artifact folder)"}),
        "--reward": ("reward", {"metavar": "SPEC",
                                "help": "comma-separated parts, each [rm:]RM_DIR[:W] | fn:NAME[:W] | "
                                        "fn:path/file.py:func[:W] (built-ins: code_judge, writes_function, "
                                        "exact_answer, number_answer)"}),
        "--prompts": ("prompts", {"metavar": "FILE_OR_DIR",
                                  "help": 'JSONL rows {"prompt": ...} or {"messages": [...]}, other fields passed to '
                                          "reward functions (sft-data or `genloop tasks` output)"}),
        "--algo": ("algo", {"choices": ["grpo", "ppo"], "help": "grpo: group advantages; ppo: value model + GAE"}),
        "--out": ("out", {"metavar": "DIR", "help": "artifact folder (model/ is the final policy, servable as is)"}),
        "--iterations": ("iterations", {"metavar": "N", "type": int, "help": "generate -> score -> learn -> sync"}),
        "--engines": ("rollout.engines", {"metavar": "N", "type": int, "help": "vLLM rollout actors"}),
        "--num-workers": ("train.num_workers", {"metavar": "N", "type": int, "help": "learner ranks (Ray Train)"}),
    }, examples="rollout.group_size=8 kl.coef=0.05 update.eps_high=0.28 update.norm_std=false train.strategy=fsdp")


def config(args: argparse.Namespace):
    from pipelines.rlhf.config import RlhfConfig

    return config_from_args(RlhfConfig, "rlhf", args)


def run(args: argparse.Namespace) -> int:
    from pipelines.rlhf.stage import plan, run as run_stage

    cfg = config(args)
    plan(cfg)  # bad inputs (missing files, tokenizer mismatch, bad reward spec) fail before Ray starts
    start_ray(args)
    res = run_stage(cfg)
    first = res.history[0] if res.history else {}
    last = res.metrics
    print(f"rlhf ({cfg.algo}): {res.iterations} iterations, reward {first.get('reward_mean', float('nan')):.3f} -> "
          f"{last.get('reward_mean', float('nan')):.3f}, KL {last.get('kl', 0.0):.4f}, sync "
          f"{last.get('sync_s', 0.0):.2f} s/iteration; policy: {res.model_dir}")
    print(json.dumps({"out": res.out, "model": res.model_dir, "iterations": res.iterations,
                      "reward_first": first.get("reward_mean"), "reward_last": last.get("reward_mean"),
                      "kl_last": last.get("kl")}))  # the last line: machine-readable
    return 0

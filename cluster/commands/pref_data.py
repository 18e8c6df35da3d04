"""``genloop pref-data``: preference pairs from a policy's own samples and the code judge (the stage:
``pipelines.prefs.pref_data``)."""

from __future__ import annotations

import argparse
import json

from cluster.commands.base import add_stage_command, config_from_args, start_ray

HELP = "preference pairs without humans: sample a policy with vLLM, score with the code judge, keep clear margins"


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    return add_stage_command(
        sub,
        "pref-data",
        HELP,
        flags={
            "--policy": ("policy", {"metavar": "CKPT", "help": "the checkpoint that samples (an SFT model)"}),
            "--prompts": (
                "prompts",
                {
                    "metavar": "SFT_DATA",
                    "help": "prompt rows: a `genloop sft-data` or `genloop tasks` file or folder "
                    "(code-writing prompts for the judge)",
                },
            ),
            "--out": ("out", {"metavar": "DIR", "help": "artifact folder (train.jsonl, val.jsonl, samples.jsonl)"}),
            "--human": ("human", {"metavar": "FILE", "help": "human preferences to merge (genloop feedback export)"}),
            "--samples": ("samples", {"metavar": "K", "type": int, "help": "answers sampled per prompt"}),
            "--reward": (
                "reward",
                {
                    "metavar": "SPEC",
                    "help": "score candidates with fn: reward parts (reading the rows' "
                    "columns, e.g. fn:exact_answer) instead of the code judge",
                },
            ),
        },
        examples="samples=8 temperature=1.0 min_margin=0.5 max_prompts=200",
    )


def config(args: argparse.Namespace):
    from pipelines.prefs.pref_data import PrefDataConfig

    return config_from_args(PrefDataConfig, "pref-data", args)


def run(args: argparse.Namespace) -> int:
    from pipelines.lifecycle import check_out
    from pipelines.prefs import pref_data

    cfg = config(args)
    check_out("pref-data", cfg.out, cfg.overwrite)  # a finished or foreign --out fails before Ray starts
    start_ray(args)
    res = pref_data.run(cfg)
    keys = (
        "out",
        "policy_judge_pass_rate",
        "policy_judge_mean_score",
        "policy_reward_pass_rate",
        "policy_reward_mean_score",
    )
    print(
        json.dumps(
            {k: res[k] for k in keys if k in res}
            | {"train_pairs": res["counts"].get("train_pairs"), "val_pairs": res["counts"].get("val_pairs")}
        )
    )
    return 0

"""``genloop reward``: a Bradley-Terry reward model from preference pairs (the stage: ``pipelines.prefs.reward``)."""

from __future__ import annotations

import argparse
import json

from cluster.commands.base import add_stage_command, config_from_args, start_ray

HELP = "train a Bradley-Terry reward model from preference pairs (Ray Train, DDP | FSDP2)"


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    return add_stage_command(
        sub,
        "reward",
        HELP,
        flags={
            "--init-from": (
                "init_from",
                {"metavar": "CKPT", "help": "the SFT checkpoint (its trunk starts the model)"},
            ),
            "--data": (
                "data",
                {
                    "metavar": "FILE_OR_DIR",
                    "help": "preference JSONL ({prompt, chosen, rejected}, messages-style, or genloop "
                    "feedback export), or a `genloop pref-data` folder",
                },
            ),
            "--val-data": ("val_data", {"metavar": "FILE", "help": "held-out preference JSONL"}),
            "--out": (
                "out",
                {"metavar": "DIR", "help": "artifact folder (model/ loads as AutoModelForSequenceClassification)"},
            ),
            "--steps": ("train.steps", {"metavar": "N", "type": int, "help": "optimizer steps"}),
            "--num-workers": ("train.num_workers", {"metavar": "N", "type": int, "help": "Ray Train workers"}),
        },
        examples="train.lr=1e-4 train.strategy=fsdp val_fraction=0.2",
    )


def config(args: argparse.Namespace):
    from pipelines.prefs.reward import RewardConfig

    return config_from_args(RewardConfig, "reward", args)


KEYS = (
    "out",
    "model",
    "heldout_pairwise_accuracy",
    "heldout_pairwise_accuracy_before",
    "heldout_mean_margin",
    "train_seconds",
)


def run(args: argparse.Namespace) -> int:
    from pipelines.lifecycle import check_out
    from pipelines.prefs import reward

    cfg = config(args)
    check_out("reward", cfg.out, cfg.overwrite)  # a finished or foreign --out fails before Ray starts
    start_ray(args)
    res = reward.run(cfg)
    print(json.dumps({k: res[k] for k in KEYS if k in res}))
    return 0

"""``genloop dpo``: offline DPO from preference pairs (the stage: ``pipelines.prefs.dpo``)."""

from __future__ import annotations

import argparse
import json

from cluster.commands.base import add_stage_command, config_from_args, start_ray

HELP = "offline DPO of a checkpoint on preference pairs (reference log-probs computed once)"


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    return add_stage_command(
        sub,
        "dpo",
        HELP,
        flags={
            "--init-from": (
                "init_from",
                {"metavar": "CKPT", "help": "the SFT checkpoint: the policy's start and the reference"},
            ),
            "--data": ("data", {"metavar": "FILE_OR_DIR", "help": "preference JSONL, or a `genloop pref-data` folder"}),
            "--val-data": ("val_data", {"metavar": "FILE", "help": "held-out preference JSONL"}),
            "--out": ("out", {"metavar": "DIR", "help": "artifact folder (model/ = HF causal-LM checkpoint)"}),
            "--beta": ("beta", {"metavar": "B", "type": float, "help": "DPO beta (KL strength)"}),
            "--steps": ("train.steps", {"metavar": "N", "type": int, "help": "optimizer steps"}),
            "--num-workers": ("train.num_workers", {"metavar": "N", "type": int, "help": "Ray Train workers"}),
        },
        examples="beta=0.1 loss=ipo label_smoothing=0.1 train.lr=5e-5",
    )


def config(args: argparse.Namespace):
    from pipelines.prefs.dpo import DpoConfig

    return config_from_args(DpoConfig, "dpo", args)


KEYS = (
    "out",
    "model",
    "heldout_preference_accuracy",
    "heldout_reward_margin",
    "heldout_logp_accuracy",
    "heldout_logp_accuracy_before",
    "train_seconds",
)


def run(args: argparse.Namespace) -> int:
    from pipelines.lifecycle import check_out
    from pipelines.prefs import dpo

    cfg = config(args)
    check_out("dpo", cfg.out, cfg.overwrite)  # a finished or foreign --out fails before Ray starts
    start_ray(args)
    res = dpo.run(cfg)
    print(json.dumps({k: res[k] for k in KEYS if k in res}))
    return 0

"""``genloop sft``: instruction fine-tuning (the stage: ``pipelines.sft.stage``)."""

from __future__ import annotations

import argparse
import json

from cluster.commands.base import add_stage_command, config_from_args, start_ray

HELP = "instruction fine-tuning (loss on answers only, optional LoRA)"


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    return add_stage_command(
        sub,
        "sft",
        HELP,
        flags={
            "--init-from": (
                "init_from",
                {"metavar": "CKPT", "help": "checkpoint folder to fine-tune, or a pretrain artifact (uses its model/)"},
            ),
            "--data": (
                "data",
                {
                    "metavar": "FILE_OR_DIR",
                    "help": "JSONL of {messages: [...]} or {prompt, response}, or a `genloop sft-data` folder",
                },
            ),
            "--val-data": (
                "val_data",
                {"metavar": "FILE", "help": "held-out JSONL (default: DATA.val.jsonl when present)"},
            ),
            "--out": (
                "out",
                {"metavar": "DIR", "help": "artifact folder (model/ = merged HF checkpoint, adapter/ = PEFT adapter)"},
            ),
            "--lora-rank": ("lora.rank", {"metavar": "R", "type": int, "help": "LoRA rank (0 = full fine-tuning)"}),
            "--steps": ("train.steps", {"metavar": "N", "type": int, "help": "optimizer steps"}),
            "--num-workers": ("train.num_workers", {"metavar": "N", "type": int, "help": "Ray Train workers"}),
        },
        examples="train.lr=1e-4 lora.rank=8 train_on=all",
    )


def config(args: argparse.Namespace):
    from pipelines.sft.stage import SftConfig

    return config_from_args(SftConfig, "sft", args)


KEYS = (
    "out",
    "heldout_answer_loss_before",
    "heldout_answer_loss_after",
    "parse_rate_before",
    "parse_rate_after",
    "train_seconds",
)


def run(args: argparse.Namespace) -> int:
    from pipelines.lifecycle import check_out
    from pipelines.sft import stage as sft

    cfg = config(args)
    check_out("sft", cfg.out, cfg.overwrite)  # a finished or foreign --out fails before Ray starts
    start_ray(args)
    res = sft.run(cfg)

    def pct(x: float | None) -> str:
        return "-" if x is None else f"{100 * x:.0f}%"

    print(
        f"sft: held-out answer loss {res['heldout_answer_loss_before']:.4f} -> "
        f"{res['heldout_answer_loss_after']:.4f}; parse rate {pct(res['parse_rate_before'])} -> "
        f"{pct(res['parse_rate_after'])}; {res.get('steps', '?')} steps in {res['train_seconds']:.0f} s; "
        f"model: {res.get('model', res['out'])}"
    )
    print(json.dumps({k: res[k] for k in KEYS if k in res}))  # the last line: machine-readable
    return 0

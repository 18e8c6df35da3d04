"""``genloop sft``: the stage's command line (the stage itself is ``pipelines.sft``)."""

from __future__ import annotations

import argparse
import json

from pipelines.sft import SftConfig, run


def register(sub: argparse._SubParsersAction) -> None:
    from cluster.cli import add_stage_parser

    p = add_stage_parser(sub, "sft", "instruction fine-tuning (loss on answers only, optional LoRA)", flags={
        "--init-from": ("init_from", {"metavar": "CKPT", "help": "checkpoint folder to fine-tune, or a pretrain artifact (uses its model/)"}),
        "--data": ("data", {"metavar": "FILE_OR_DIR", "help": "JSONL of {messages: [...]} or {prompt, response}, or a `genloop sft-data` folder"}),
        "--val-data": ("val_data", {"metavar": "FILE", "help": "held-out JSONL (default: DATA.val.jsonl when present)"}),
        "--out": ("out", {"metavar": "DIR", "help": "artifact folder (model/ = merged HF checkpoint, adapter/ = PEFT adapter)"}),
        "--lora-rank": ("lora.rank", {"metavar": "R", "type": int, "help": "LoRA rank (0 = full fine-tuning)"}),
        "--steps": ("train.steps", {"metavar": "N", "type": int, "help": "optimizer steps"}),
        "--num-workers": ("train.num_workers", {"metavar": "N", "type": int, "help": "Ray Train workers"}),
    })
    p.add_argument("--overwrite", dest="flag__overwrite", action="store_const", const=True, default=None,
                   help="replace a finished artifact at --out")
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    from cluster.cli import config_from_args

    res = run(config_from_args(SftConfig, "sft", args), address=args.address)
    keys = ("out", "heldout_answer_loss_before", "heldout_answer_loss_after", "parse_rate_before", "parse_rate_after",
            "train_seconds")
    print(json.dumps({k: res[k] for k in keys}))
    return 0

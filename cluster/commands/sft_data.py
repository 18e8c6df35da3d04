"""``genloop sft-data``: an instruction set from a code corpus (the stage: ``pipelines.sft.data``)."""

from __future__ import annotations

import argparse
import json

from cluster.commands.base import add_stage_command, config_from_args

HELP = "build an instruction set from a code corpus"


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    return add_stage_command(
        sub,
        "sft-data",
        HELP,
        flags={
            "--from-code": (
                "from_code",
                {"metavar": "PATHS", "help": "comma-separated Python files/folders (default: this Python's stdlib)"},
            ),
            "--out": (
                "out",
                {
                    "metavar": "FILE_OR_DIR",
                    "help": "output FILE.jsonl (held-out split: FILE.val.jsonl) or artifact folder DIR",
                },
            ),
        },
        examples="max_code_lines=8 tasks=[write] val_fraction=0.1",
        ray=False,
    )


def config(args: argparse.Namespace):
    from pipelines.sft.data import SftDataConfig

    return config_from_args(SftDataConfig, "sft-data", args)


def run(args: argparse.Namespace) -> int:
    from pipelines.sft.data import run as build

    stats = build(config(args))
    c = stats["counts"]
    print(
        f"sft-data: {c.get('train', 0):,} train + {c.get('val', 0):,} held-out examples from "
        f"{c.get('functions', 0):,} functions -> {stats['out']}, {stats['val']}"
    )
    print(json.dumps({**c, "out": stats["out"], "val_out": stats["val"]}))  # the last line: machine-readable
    return 0

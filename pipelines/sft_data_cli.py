"""``genloop sft-data``: the stage's command line (the stage itself is ``pipelines.sft_data``)."""

from __future__ import annotations

import argparse
import json

from pipelines.sft_data import SftDataConfig, run


def register(sub: argparse._SubParsersAction) -> None:
    from cluster.cli import add_stage_parser

    p = add_stage_parser(sub, "sft-data", "build an instruction set from a code corpus", flags={
        "--from-code": ("from_code", {"metavar": "PATHS", "help": "comma-separated Python files/folders (default: this Python's stdlib)"}),
        "--out": ("out", {"metavar": "FILE_OR_DIR", "help": "output FILE.jsonl (held-out split: FILE.val.jsonl) or artifact folder DIR"}),
    })
    p.add_argument("--overwrite", dest="flag__overwrite", action="store_const", const=True, default=None,
                   help="replace an existing output file")
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    from cluster.cli import config_from_args

    stats = run(config_from_args(SftDataConfig, "sft-data", args))
    print(json.dumps({"out": stats["out"], "val": stats["val"], **stats["counts"]}))
    return 0

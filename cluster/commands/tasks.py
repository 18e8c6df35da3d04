"""``genloop tasks arithmetic``: generated problems with reference answers, for RL with verifiable rewards (the
generator: ``pipelines.tasks``).

::

    genloop tasks arithmetic --out DIR [--n 2000 --heldout 256 --digits 2 --ops +,- --seed 0]

``DIR/train.jsonl`` and ``DIR/heldout.jsonl`` hold ``{"prompt": "Compute 47+38. Reply with the number only.",
"answer": "85", "a": 47, "op": "+", "b": 38}`` rows; the two splits share no problem. ``--prompts DIR`` (rlhf)
reads train.jsonl; ``genloop eval --prompts DIR/heldout.jsonl --reward fn:exact_answer,fn:number_answer`` scores
the held-out split.
"""

from __future__ import annotations

import argparse
import json

from cluster.commands.base import add_overwrite

HELP = "generate tasks with reference answers (arithmetic): a train and a held-out split that share no problem"


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("tasks", help=HELP, description=HELP)
    tsub = p.add_subparsers(dest="task", metavar="TASK", required=True)
    a = tsub.add_parser(
        "arithmetic",
        help='"Compute 47+38. Reply with the number only." with answer "85"',
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    a.add_argument("--out", required=True, metavar="DIR", help="folder for train.jsonl, heldout.jsonl, manifest.json")
    a.add_argument("--n", type=int, default=2000, metavar="N", help="train problems")
    a.add_argument("--heldout", type=int, default=256, metavar="N", help="held-out problems (never in train)")
    a.add_argument("--digits", type=int, default=2, metavar="D", help="digits per operand (1: 0..9)")
    a.add_argument("--ops", default="+", metavar="OPS", help="comma-separated operators of + - *")
    a.add_argument("--seed", type=int, default=0, metavar="S")
    add_overwrite(a, key=None, help="replace a finished tasks artifact at --out")
    return p


def run(args: argparse.Namespace) -> int:
    from pipelines.tasks import ArithmeticConfig, run_arithmetic

    res = run_arithmetic(
        ArithmeticConfig(
            out=args.out,
            n=args.n,
            heldout=args.heldout,
            digits=args.digits,
            ops=args.ops,
            seed=args.seed,
            overwrite=args.overwrite,
        )
    )
    print(
        f"tasks arithmetic: {res['train']:,} train + {res['heldout']:,} held-out problems (of {res['space']:,}) "
        f"-> {res['out']}"
    )
    print(json.dumps(res))  # the last line: machine-readable
    return 0

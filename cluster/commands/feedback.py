"""``genloop feedback export --out prefs.jsonl [--model-version V]``: what users rated, as the reward-model stage's
input (``genloop reward --data prefs.jsonl``); with ``--model-version`` only the ratings and pairs of the answers one
model version gave (the version every response names)."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "export collected user feedback as preference data"


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("feedback", help=HELP, description=HELP)
    fs = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    e = fs.add_parser(
        "export",
        help="write (prompt, chosen, rejected) and (prompt, response, rating) JSONL",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    e.add_argument("--store", default="runs/serve/feedback.db", help="the server's feedback.db")
    e.add_argument("--out", required=True, help="preference pairs JSONL")
    e.add_argument("--ratings-out", default=None, help="ratings JSONL (default: <out stem>.ratings.jsonl)")
    e.add_argument(
        "--model-version",
        default=None,
        metavar="V",
        help="only this model version's ratings and pairs (both answers of a pair from it); default: every version",
    )
    return p


def run(args: argparse.Namespace) -> int:
    from serve.feedback import FeedbackStore

    if not Path(args.store).is_file():
        raise FileNotFoundError(
            f"feedback store {args.store} does not exist; pass --store (the server writes "
            "feedback.db next to its knowledge store)"
        )
    version = getattr(args, "model_version", None)
    out = FeedbackStore(args.store).export(args.out, args.ratings_out, model_version=version)
    print(
        f"wrote {out['preferences']} preference pairs to {out['out']} and {out['ratings']} ratings to "
        f"{out['ratings_out']}" + (f" (model version {version})" if version is not None else "")
    )
    return 0

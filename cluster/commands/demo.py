"""``genloop demo`` (``make demo``): every stage end to end on the embedded corpus (the driver: ``cluster.demo``)."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "every stage end to end on the embedded corpus (what `make demo` runs)"


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("demo", help=HELP, description=HELP, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="runs/demo", help="folder for every step's artifact")
    p.add_argument("--config", default="demo", metavar="PRESET", help="preset for every stage (tiny: a quick check)")
    p.add_argument("--fresh", action="store_true", help="delete --out first (else finished steps are skipped)")
    p.add_argument("--only", nargs="*", metavar="STEP", help="run only these steps")
    p.add_argument("--verbose", action="store_true", help="show Ray's and vLLM's logs on the terminal too")
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="overrides of the preset's demo: section, e.g. real_model.iterations=14 real_model.heldout=256 "
        "(the README's longer GRPO run) or from_scratch_alignment=true",
    )
    return p


def _only_and_overrides(args: argparse.Namespace) -> tuple[list[str] | None, list[str]]:
    """``--only a b key=value``: argparse gives the overrides after --only to it; they are overrides all the same."""
    only = [x for x in args.only or [] if "=" not in x] or None
    return only, [*(x for x in args.only or [] if "=" in x), *args.overrides]


def config(args: argparse.Namespace):
    """The preset's ``demo:`` section with the overrides (a bad key or value fails here, before any step)."""
    from cluster.demo import demo_config

    return demo_config(args.config, _only_and_overrides(args)[1])


def run(args: argparse.Namespace) -> int:
    from cluster import demo

    config(args)
    only, overrides = _only_and_overrides(args)
    return demo.run(Path(args.out), args.config, fresh=args.fresh, only=only, verbose=args.verbose, overrides=overrides)

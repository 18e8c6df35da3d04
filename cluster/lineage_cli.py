"""``genloop lineage PATH``: an artifact and its inputs, back to the raw corpus."""

from __future__ import annotations

import argparse

from pipelines.artifacts import lineage


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("lineage", help="walk an artifact's inputs back to the raw corpus",
                       description="Print an artifact (a folder with manifest.json) and each of its inputs, recursively.")
    p.add_argument("path", help="artifact folder or URI")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    for depth, entry in lineage(args.path):
        extra = f" [{entry['status']}] {entry.get('started') or ''}" if entry.get("status") else ""
        print(f"{'  ' * depth}{'└─ ' if depth else ''}{entry['stage']}: {entry['path']}{extra}")
    return 0

"""``genloop lineage PATH``: an artifact and its inputs, back to the raw corpus."""

from __future__ import annotations

import argparse

HELP = "walk an artifact's inputs back to the raw corpus"


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "lineage",
        help=HELP,
        description="Print an artifact (a folder or URI with manifest.json) and "
        "each of its inputs, recursively, down to the raw corpus.",
    )
    p.add_argument("path", help="artifact folder or URI (s3://, gs://)")
    return p


def run(args: argparse.Namespace) -> int:
    from pipelines.artifacts import lineage

    for depth, entry in lineage(args.path):
        extra = f" [{entry['status']}] {entry.get('started') or ''}" if entry.get("status") else ""
        print(f"{'  ' * depth}{'└─ ' if depth else ''}{entry['stage']}: {entry['path']}{extra}")
    return 0

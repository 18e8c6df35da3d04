"""The ``genloop`` command: parse, pick the command from ``cluster.commands.COMMANDS``, run it.

Only the chosen command's module is imported, so ``genloop --help`` is quick. The convention every command follows
is in ``cluster/commands/__init__.py``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Sequence

from cluster.commands import BY_NAME, COMMANDS

log = logging.getLogger("genloop")

DESCRIPTION = "genloop: the whole learning loop of a generative language model on Ray, one command per stage."

EPILOG = """\
Every stage writes an artifact folder with manifest.json. Without --address / RAY_ADDRESS an embedded local Ray is
started. Config: --config PRESET (configs/*.yaml: tiny, demo, gpt2-124m, llama-1b, llama-8b) or a YAML path, then
key=value overrides (e.g. train.lr=3e-4 model.dim=128). Run `genloop COMMAND --help` for a command's options.
"""


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def build_parser(command: str | None) -> argparse.ArgumentParser:
    """The parser; only ``command``'s module is imported and registered (the others are listed by name)."""
    parser = argparse.ArgumentParser(
        prog="genloop", description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--address",
        default=os.environ.get("RAY_ADDRESS"),
        help="Ray cluster address (default: $RAY_ADDRESS, else an embedded local Ray)",
    )
    parser.add_argument("--log-level", default=os.environ.get("GENLOOP_LOG_LEVEL", "INFO"))
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for c in COMMANDS:
        if c.name == command:
            module = c.load()
            p = module.register(sub)
            p.set_defaults(_run=module.run)
        else:
            sub.add_parser(c.name, help=c.help, add_help=False)
    return parser


def find_command(argv: Sequence[str]) -> str | None:
    it = iter(argv)
    for tok in it:
        if tok in ("--address", "--log-level"):
            next(it, None)
        elif not tok.startswith("-"):
            return tok
    return None


def main(argv: Sequence[str] | None = None) -> int:
    from pipelines.config import ConfigError

    argv = list(sys.argv[1:] if argv is None else argv)
    command = find_command(argv)
    if command is not None and command not in BY_NAME:
        print(f"genloop: unknown command {command!r}; choose one of: {', '.join(BY_NAME)}", file=sys.stderr)
        return 2
    parser = build_parser(command)
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 0
    setup_logging(args.log_level)
    try:
        result = args._run(args)
    except ConfigError as e:
        print(f"genloop {args.command}: config error: {e}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError, PermissionError) as e:
        # errors are written to be read as one line: name the file/key and what to do
        if os.environ.get("GENLOOP_DEBUG"):
            raise
        print(f"genloop {args.command}: error: {e}", file=sys.stderr)
        return 1
    return int(result) if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())

"""The options every command shares, added once: ``--config``, ``key=value`` overrides, ``--overwrite``,
``--address``; and the two steps every stage command takes: build the typed config, start Ray."""

from __future__ import annotations

import argparse
import os
from typing import Any, TypeVar

from pipelines.config import build_config, parse_override

T = TypeVar("T")

FLAG_PREFIX = "flag__"  # argparse dest of a flag that is a shorthand for a config key: flag__train__steps


def add_address(p: argparse.ArgumentParser) -> None:
    """``--address``: the Ray cluster. Also accepted before the command (``genloop --address A data ...``)."""
    p.add_argument(
        "--address",
        default=argparse.SUPPRESS,
        metavar="ADDR",
        help="Ray cluster to join (default: $RAY_ADDRESS, else an embedded local Ray)",
    )


def add_overwrite(
    p: argparse.ArgumentParser, key: str | None = "overwrite", help: str = "replace a finished artifact at --out"
) -> None:
    """``--overwrite``: sets config key ``key`` (or plain ``args.overwrite`` when ``key`` is None)."""
    if key is None:
        p.add_argument("--overwrite", action="store_true", help=help)
    else:
        p.add_argument(
            "--overwrite",
            dest=FLAG_PREFIX + key.replace(".", "__"),
            action="store_const",
            const=True,
            default=None,
            help=help,
        )


def add_stage_command(
    sub: argparse._SubParsersAction,
    name: str,
    help: str,
    flags: dict[str, tuple[str, dict[str, Any]]] | None = None,
    *,
    examples: str,
    description: str | None = None,
    overwrite: bool = True,
    ray: bool = True,
) -> argparse.ArgumentParser:
    """A stage's parser: ``--config``, ``key=value`` overrides, ``--overwrite``, ``--address``, plus ``flags``.

    ``flags`` maps an option (``--out``) to (config key, argparse kwargs); a flag's value becomes that key's
    override, applied before the positional ``key=value`` overrides. ``examples`` are overrides this stage accepts,
    shown in its ``--help`` (tests/test_cli_examples.py builds the stage's config from them, so they stay true).
    """
    p = sub.add_parser(
        name, help=help, description=description or help, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument(
        "--config",
        default=None,
        metavar="PRESET",
        help="preset name in configs/ (tiny, demo, ...) or a YAML file; its section for this stage is used",
    )
    for opt, (key, kwargs) in (flags or {}).items():
        if "action" not in kwargs and "choices" not in kwargs and "metavar" not in kwargs:
            kwargs = {"metavar": opt.lstrip("-").upper().replace("-", "_"), **kwargs}
        p.add_argument(opt, dest=FLAG_PREFIX + key.replace(".", "__"), default=None, **kwargs)
    if overwrite:
        add_overwrite(p)
    if ray:
        add_address(p)
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help=f"config overrides, applied last; dotted keys reach sections (e.g. {examples})",
    )
    return p


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """Flags first, then the positional ``key=value`` overrides (so these win)."""
    over: dict[str, Any] = {}
    for k, v in vars(args).items():
        if k.startswith(FLAG_PREFIX) and v is not None:
            over[k[len(FLAG_PREFIX) :].replace("__", ".")] = v
    for text in getattr(args, "overrides", None) or []:
        key, value = parse_override(text)
        over[key] = value
    return over


def config_from_args(cls: type[T], section: str, args: argparse.Namespace) -> T:
    """The stage's typed config: defaults, ``--config``'s section, the flags, the ``key=value`` overrides."""
    return build_config(cls, section, getattr(args, "config", None), overrides_from_args(args))


def address_of(args: argparse.Namespace) -> str | None:
    return getattr(args, "address", None) or os.environ.get("RAY_ADDRESS") or None


def start_ray(args: argparse.Namespace) -> None:
    """Join ``--address`` / ``$RAY_ADDRESS`` or start an embedded local Ray (once per process)."""
    from cluster.runtime import init_ray

    init_ray(address_of(args))

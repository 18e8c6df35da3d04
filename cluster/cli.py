"""The ``genloop`` command: one subcommand per stage.

Every stage subcommand takes ``--config PRESET_OR_YAML``, ``key=value`` overrides, and its own flags that are
shorthands for config keys. Stage modules are imported only when their subcommand runs, so ``genloop --help`` is
quick. A stage module exposes ``register(subparsers)``; the table below says where each one lives.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from typing import Any, Callable, Sequence, TypeVar

from pipelines.config import ConfigError, build_config, parse_override

log = logging.getLogger("genloop")

T = TypeVar("T")

# subcommand -> (module with register(), one-line help)
STAGES: dict[str, tuple[str, str]] = {
    "tokenizer": ("cluster.tokenizer_cli", "train a BPE tokenizer (tiktoken format) or inspect one"),
    "data": ("pipelines.data_cli", "clean, deduplicate and tokenize corpora into training blocks (Ray Data)"),
    "pretrain": ("pipelines.pretrain_cli", "pretrain or domain-fine-tune the transformer (Ray Train, DDP | FSDP2)"),
    "sft-data": ("pipelines.sft_data_cli", "build an instruction set from a code corpus"),
    "sft": ("pipelines.sft_cli", "instruction fine-tuning (loss on answers only, optional LoRA)"),
    "serve": ("serve.serve_cli", "serve a checkpoint over OpenAI-compatible HTTP with RAG (Ray Serve + vLLM)"),
    "knowledge": ("serve.knowledge_cli", "add documents to a knowledge store in bulk"),
    "feedback": ("serve.feedback_cli", "export collected user feedback as preference data"),
    "lineage": ("cluster.lineage_cli", "walk an artifact's inputs back to the raw corpus"),
    "submit": ("cluster.jobs_cli", "submit a genloop stage as a Ray job"),
    "jobs": ("cluster.jobs_cli", "list, inspect, follow or stop Ray jobs"),
}

EPILOG = """\
Every stage writes an artifact folder with manifest.json. Without --address / RAY_ADDRESS an embedded local Ray is
started. Config: --config PRESET (configs/*.yaml: tiny, demo, gpt2-124m, llama-1b, llama-8b) or a YAML path, then
key=value overrides (e.g. lr=3e-4 model.dim=128). Run `genloop STAGE --help` for a stage's options.
"""


def add_stage_parser(sub: argparse._SubParsersAction, name: str, help: str, flags: dict[str, tuple[str, dict]],
                     description: str | None = None) -> argparse.ArgumentParser:
    """A stage's parser: ``--config``, ``--overwrite``, ``key=value`` overrides, plus ``flags``.

    ``flags`` maps an option (``--out``) to (config key, argparse kwargs); its value becomes that override.
    """
    p = sub.add_parser(name, help=help, description=description or help,
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", default=None, help="preset name in configs/ or a YAML file; its section for this stage is used")
    for opt, (key, kwargs) in flags.items():
        if "action" not in kwargs and "choices" not in kwargs:
            kwargs = {"metavar": opt.lstrip("-").upper().replace("-", "_"), **kwargs}
        p.add_argument(opt, dest=f"flag__{key.replace('.', '__')}", default=None, **kwargs)
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, applied last")
    return p


def config_from_args(cls: type[T], stage: str, args: argparse.Namespace) -> T:
    """The stage's typed config from ``--config``, its flags and ``key=value`` overrides (in that order)."""
    flag_over: dict[str, Any] = {}
    for k, v in vars(args).items():
        if k.startswith("flag__") and v is not None:
            flag_over[k[len("flag__"):].replace("__", ".")] = v
    over: dict[str, Any] = dict(flag_over)
    for text in getattr(args, "overrides", []) or []:
        key, value = parse_override(text)
        over[key] = value
    return build_config(cls, stage, args.config, over)


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def build_parser(stage: str | None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="genloop", description=__doc__.split("\n\n")[0], epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--address", default=os.environ.get("RAY_ADDRESS"),
                        help="Ray cluster address (default: $RAY_ADDRESS, else an embedded local Ray)")
    parser.add_argument("--log-level", default=os.environ.get("GENLOOP_LOG_LEVEL", "INFO"))
    sub = parser.add_subparsers(dest="stage", metavar="STAGE")
    registered: set[str] = set()
    for name, (module, help_text) in STAGES.items():
        if name == stage and module not in registered:
            registered.add(module)
            importlib.import_module(module).register(sub)
        elif name != stage and name not in sub.choices:  # a module may register several subcommands
            sub.add_parser(name, help=help_text, add_help=False)
    return parser


def find_stage(argv: Sequence[str]) -> str | None:
    it = iter(argv)
    for tok in it:
        if tok in ("--address", "--log-level"):
            next(it, None)
        elif not tok.startswith("-"):
            return tok
    return None


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    stage = find_stage(argv)
    if stage is not None and stage not in STAGES:
        print(f"genloop: unknown stage {stage!r}; choose one of: {', '.join(STAGES)}", file=sys.stderr)
        return 2
    parser = build_parser(stage)
    args = parser.parse_args(argv)
    if not args.stage:
        parser.print_help()
        return 0
    setup_logging(args.log_level)
    func: Callable[[argparse.Namespace], Any] = args.func
    try:
        result = func(args)
    except ConfigError as e:
        print(f"genloop {args.stage}: config error: {e}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError, PermissionError) as e:
        # stage errors are written to be read as one line: name the file/key and what to do
        if os.environ.get("GENLOOP_DEBUG"):
            raise
        print(f"genloop {args.stage}: error: {e}", file=sys.stderr)
        return 1
    return int(result) if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())

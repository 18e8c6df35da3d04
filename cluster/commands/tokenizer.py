"""``genloop tokenizer train|show``: a byte-level BPE trained on a text sample, saved in tiktoken format."""

from __future__ import annotations

import argparse
import glob
import json
import logging
from pathlib import Path
from typing import Iterator

from cluster.commands.base import add_overwrite

log = logging.getLogger(__name__)


def default_corpus_files() -> list[str]:
    """The embedded default corpus's sources: the same stdlib listing the data stage uses (no site-packages)."""
    from pipelines.data.stage import stdlib_files

    return stdlib_files([".py"])


def expand_inputs(inputs: list[str]) -> list[str]:
    files: list[str] = []
    for pattern in inputs:
        p = Path(pattern)
        if p.is_dir():
            files += sorted(str(f) for f in p.rglob("*") if f.is_file())
        else:
            files += sorted(glob.glob(pattern, recursive=True))
    if not files:
        raise FileNotFoundError(f"--input {' '.join(inputs)} matches no files; give files, folders or globs")
    return files


def iter_texts(files: list[str], max_bytes: int) -> Iterator[str]:
    """Texts from ``files`` until ``max_bytes`` are read; undecodable bytes are replaced, not fatal."""
    total = 0
    for f in files:
        try:
            data = Path(f).read_bytes()[: max_bytes - total]
        except OSError as e:
            log.warning("skipping unreadable %s (%s)", f, e)
            continue
        if b"\0" in data[:1024]:
            continue  # binary
        total += len(data)
        yield data.decode("utf-8", errors="replace")
        if total >= max_bytes:
            return


HELP = "train a BPE tokenizer (tiktoken format) or inspect one"


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("tokenizer", help=HELP, description=HELP)
    tsub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    t = tsub.add_parser(
        "train", help="train a byte-level BPE on a text sample", formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    t.add_argument("--input", nargs="*", default=[], help="files, folders or globs (default: the stdlib sources)")
    t.add_argument("--vocab-size", type=int, default=8192, help="including the chat special tokens")
    t.add_argument("--max-bytes", type=int, default=50_000_000, help="stop reading input after this many bytes")
    t.add_argument("--name", default="genloop-bpe")
    t.add_argument("--out", required=True, help="folder for tokenizer.tiktoken + tokenizer_spec.json")
    add_overwrite(t, key=None, help="replace a finished tokenizer at --out")
    s = tsub.add_parser("show", help="encode a text with a tokenizer and print the ids")
    s.add_argument("spec", help="tokenizer folder, spec file, checkpoint or named encoding (cl100k_base)")
    s.add_argument("text", nargs="?", default="Hello, world! def f(x): return x")
    return p


def run(args: argparse.Namespace) -> int:
    return train_cmd(args) if args.action == "train" else show_cmd(args)


def train_cmd(args: argparse.Namespace) -> int:
    from models.tokenizer import train
    from pipelines.artifacts import Manifest

    files = expand_inputs(args.input) if args.input else default_corpus_files()
    cfg = {
        "inputs": args.input or ["<stdlib>"],
        "vocab_size": args.vocab_size,
        "max_bytes": args.max_bytes,
        "name": args.name,
    }
    m = Manifest.begin("tokenizer", args.out, cfg, inputs=args.input, overwrite=args.overwrite)
    tok = train(iter_texts(files, args.max_bytes), args.vocab_size, name=args.name)
    tok.save(args.out)
    m.finish(counts={"files": len(files), "n_vocab": tok.n_vocab})
    print(f"tokenizer {tok.name}: n_vocab={tok.n_vocab} -> {args.out}")
    return 0


def show_cmd(args: argparse.Namespace) -> int:
    from models.tokenizer import Tokenizer

    tok = Tokenizer.load(args.spec)
    ids = tok.encode(args.text)
    print(json.dumps({"name": tok.name, "n_vocab": tok.n_vocab, "special_tokens": tok.special_tokens, "ids": ids}))
    return 0

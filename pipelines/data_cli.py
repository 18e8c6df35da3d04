"""``genloop data``: the stage's command line (the stage itself is ``pipelines.data``)."""

from __future__ import annotations

import argparse

from pipelines import data


def register(sub: argparse._SubParsersAction) -> None:
    from cluster.cli import add_stage_parser

    p = add_stage_parser(sub, "data", "clean, deduplicate and tokenize corpora into training blocks (Ray Data)", flags={
        "--input": ("input", {"nargs": "+", "metavar": "PATH",
                              "help": "files, folders, globs or s3:// gs:// URIs: text/source files, JSONL, JSON, "
                                      "Parquet (default: this Python's stdlib sources and docs)"}),
        "--tokenizer": ("tokenizer", {"help": "tokenizer folder / spec / named encoding (cl100k_base); default: "
                                              "train a BPE of vocab_size on the cleaned corpus"}),
        "--out": ("out", {"help": "output folder (or s3:// gs:// URI)"}),
        "--seq-len": ("seq_len", {"type": int, "help": "block length; blocks hold seq_len + 1 ids"}),
        "--text-field": ("text_field", {"help": "JSONL/JSON/Parquet field with the text"}),
    })
    p.add_argument("--overwrite", dest="flag__overwrite", action="store_const", const=True, default=None,
                   help="replace a finished output folder")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from cluster.cli import config_from_args
    from cluster.runtime import init_ray

    cfg = config_from_args(data.DataConfig, "data", args)
    data._check_config(cfg)
    if cfg.input:
        data.list_inputs(cfg.input)     # a path matching nothing fails here, before Ray starts
    init_ray(args.address)
    counts = data.run(cfg)
    print(data.summary_table(counts))
    m = counts["metrics"]
    print(f"data -> {cfg.out} in {m['seconds']} s ({m['mb_per_s']} MB/s read)")
    return 0

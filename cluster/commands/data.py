"""``genloop data``: clean, deduplicate and tokenize corpora into training blocks (the stage: ``pipelines.data.stage``)."""

from __future__ import annotations

import argparse

from cluster.commands.base import add_stage_command, config_from_args, start_ray

HELP = "clean, deduplicate and tokenize corpora into training blocks (Ray Data)"


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    return add_stage_command(
        sub,
        "data",
        HELP,
        flags={
            "--input": (
                "input",
                {
                    "nargs": "+",
                    "metavar": "PATH",
                    "help": "files, folders, globs or s3:// gs:// URIs: text/source files, JSONL, JSON, "
                    "Parquet (default: this Python's stdlib sources and docs)",
                },
            ),
            "--tokenizer": (
                "tokenizer",
                {
                    "help": "tokenizer folder / spec / named encoding (cl100k_base); default: "
                    "train a BPE of vocab_size on the cleaned corpus"
                },
            ),
            "--out": ("out", {"help": "output folder (or s3:// gs:// URI)"}),
            "--seq-len": ("seq_len", {"type": int, "help": "block length; blocks hold seq_len + 1 ids"}),
            "--text-field": ("text_field", {"help": "JSONL/JSON/Parquet field with the text"}),
        },
        examples="seq_len=512 minhash.threshold=0.8 pii=false",
    )


def config(args: argparse.Namespace):
    from pipelines.data.stage import DataConfig

    return config_from_args(DataConfig, "data", args)


def run(args: argparse.Namespace) -> int:
    from pipelines.data import stage as data
    from pipelines.lifecycle import check_out

    cfg = config(args)
    data.check_config(cfg)
    if cfg.input:
        data.list_inputs(cfg.input)  # a path matching nothing fails here, before Ray starts
    check_out("data", cfg.out, cfg.overwrite)  # a finished or foreign --out fails before Ray starts
    start_ray(args)
    counts = data.run(cfg)
    print(data.summary_table(counts))
    m = counts["metrics"]
    print(f"data -> {cfg.out} in {m['seconds']} s ({m['mb_per_s']} MB/s read)")
    return 0

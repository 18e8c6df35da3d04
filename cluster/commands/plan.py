"""``genloop plan``: what a pretraining run costs before it starts (the estimate: ``pipelines.pretrain.plan``)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cluster.commands.base import FLAG_PREFIX, add_stage_command

HELP = "estimate a pretraining run: parameters, FLOPs, memory per GPU, fewest GPUs, days and cost"

# flag -> PlanConfig key; the positional key=value overrides go to the preset's pretrain: section
FLAGS = {
    "--tokens": (
        "tokens",
        {"type": float, "help": "training tokens, e.g. 15e12 (default: compute-optimal, 20 per parameter)"},
    ),
    "--gpu": (
        "gpu",
        {
            "help": "GPU type, a key of the GPUS table in pipelines/train/metrics.py: h100, h100-pcie, "
            "h100-nvl, h200, h200-nvl, a100, a100-40gb, l4, b200; or cpu (measured here)"
        },
    ),
    "--gpus": ("gpus", {"type": int, "help": "number of GPUs (default: the preset's train.num_workers)"}),
    "--mfu": ("mfu", {"type": float, "help": "model FLOPs utilisation to assume (default 0.4)"}),
    "--price-per-gpu-hour": ("price_per_gpu_hour", {"type": float, "help": "USD per GPU-hour, for the cost line"}),
    "--usable-memory": ("usable_memory", {"type": float, "help": "share of GPU memory a run may fill (default 0.9)"}),
}


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = add_stage_command(
        sub,
        "plan",
        HELP,
        FLAGS,
        overwrite=False,
        ray=False,
        examples="train.micro_batch_size=1 seq_len=8192 model.n_layers=40",
        description=(
            "Size the run that pretrain would start with the same --config (the preset's pretrain: section: model, "
            "seq_len, micro-batch, strategy, activation checkpointing) at a token budget on a GPU type: parameters, "
            "training FLOPs (6ND + attention), memory per GPU under DDP and FSDP2 with and without activation "
            "checkpointing, the fewest GPUs that fit, tokens/s and days at an MFU, GPU-hours and cost. key=value "
            "overrides change the pretrain section. Example: genloop plan --config llama-8b --tokens 15e12 --gpu h100 "
            "--gpus 1024 --price-per-gpu-hour 2.5"
        ),
    )
    p.add_argument(
        "--model",
        default=None,
        metavar="PRESET",
        help="model preset instead of the pretrain section's (tiny, demo, gpt2-124m, llama-1b, llama-8b)",
    )
    p.add_argument(
        "--data",
        default=None,
        metavar="DIR",
        help="a tokenized dataset: plan with its block length and tokenizer (as pretrain would)",
    )
    p.add_argument(
        "--init-from",
        default=None,
        metavar="CKPT",
        help="a checkpoint to continue from (domain fine-tuning): plan with its architecture",
    )
    p.add_argument("--json", default=None, metavar="FILE", help="also write the plan as JSON to FILE")
    return p


def run(args: argparse.Namespace) -> int:
    from pipelines.config import ConfigError, build_config, parse_override
    from pipelines.data.config import DataConfig
    from pipelines.pretrain.plan import PlanConfig, format_plan, make_plan, run_shape

    if not args.config:
        raise ConfigError("genloop plan needs --config PRESET (e.g. llama-8b) or a YAML file with a pretrain: section")
    flags = {k[len(FLAG_PREFIX) :]: v for k, v in vars(args).items() if k.startswith(FLAG_PREFIX) and v is not None}
    plan_cfg = build_config(PlanConfig, "plan", args.config, flags)
    section = dict(parse_override(o) for o in args.overrides or [])
    for key in ("model", "data", "init_from"):
        if getattr(args, key):
            section[key] = getattr(args, key)
    # the data section gives seq_len and the vocabulary, unless --data / data= names a tokenized dataset that does
    data_section = build_config(DataConfig, "data", args.config, required=not section.get("data"))
    result = make_plan(run_shape(args.config, section, data_section), plan_cfg)
    print(format_plan(result))
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n")
        print(f"plan written to {path}")
    return 0

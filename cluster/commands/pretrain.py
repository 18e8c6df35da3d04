"""``genloop pretrain``: pretraining and domain fine-tuning (the stage: ``pipelines.pretrain.stage``)."""

from __future__ import annotations

import argparse

from cluster.commands.base import add_stage_command, config_from_args, start_ray

HELP = "pretrain or domain-fine-tune the transformer (Ray Train, DDP | FSDP2)"


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    return add_stage_command(
        sub,
        "pretrain",
        HELP,
        {
            "--data": ("data", {"help": "tokenized dataset folder (from `genloop data`)"}),
            "--out": ("out", {"help": "artifact folder; the model lands in OUT/model"}),
            "--model": (
                "model.preset",
                {
                    "help": "model preset for a fresh model (tiny, demo, gpt2-124m, llama-1b, "
                    "llama-8b); model.KEY=VALUE overrides one field"
                },
            ),
            "--init-from": (
                "init_from",
                {"help": "checkpoint (or pretrain artifact) to continue from: domain fine-tuning"},
            ),
            "--strategy": ("train.strategy", {"choices": ["ddp", "fsdp", "none"], "help": "data-parallel strategy"}),
            "--num-workers": ("train.num_workers", {"type": int, "help": "Ray Train workers"}),
            "--use-gpu": (
                "train.use_gpu",
                {
                    "action": "store_const",
                    "const": True,
                    "help": "one GPU per worker (default: GPUs if the cluster has them)",
                },
            ),
            "--steps": ("train.steps", {"type": int, "help": "optimizer steps"}),
            "--seq-len": ("seq_len", {"type": int, "help": "tokens per row (default: the dataset's)"}),
        },
        examples="train.lr=3e-4 model.dim=128 train.steps=200",
        description="Pretraining and domain fine-tuning on Ray Train (DDP | FSDP2). Example: "
        "genloop pretrain --config tiny --data runs/data --out runs/pt model.dim=128 train.lr=3e-4",
    )


def config(args: argparse.Namespace):
    from pipelines.pretrain.config import PretrainConfig

    return config_from_args(PretrainConfig, "pretrain", args)


def run(args: argparse.Namespace) -> int:
    from pipelines.lifecycle import check_out
    from pipelines.pretrain import stage as pretrain

    cfg = config(args)
    pretrain.plan(cfg)  # bad inputs fail here, before Ray starts
    check_out("pretrain", cfg.out, cfg.overwrite)  # a finished or foreign --out fails before Ray starts
    start_ray(args)
    result = pretrain.run(cfg)
    m = result.metrics
    print(
        f"pretrain: {result.steps} steps, loss {m.get('loss', float('nan')):.4f}, "
        f"val_loss {m.get('val_loss', float('nan')):.4f} (ppl {m.get('val_ppl', float('nan')):.1f}), "
        f"{m.get('tokens_per_s', 0):.0f} tokens/s, MFU {100 * m.get('mfu', 0):.1f}%"
    )
    print(f"model: {result.model_dir}")
    return 0

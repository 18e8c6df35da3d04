"""``genloop pretrain``: the stage's command line (the stage itself is ``pipelines.pretrain``)."""

from __future__ import annotations

import argparse

from pipelines import pretrain


def register(sub: argparse._SubParsersAction) -> None:
    from cluster.cli import add_stage_parser

    p = add_stage_parser(sub, "pretrain", "pretrain or domain-fine-tune the transformer (Ray Train, DDP | FSDP2)", {
        "--data": ("data", {"help": "tokenized dataset folder (from `genloop data`)"}),
        "--out": ("out", {"help": "artifact folder; the model lands in OUT/model"}),
        "--model": ("model", {"help": "model preset for a fresh model (tiny, demo, gpt2-124m, llama-1b, llama-8b)"}),
        "--init-from": ("init_from", {"help": "checkpoint (or pretrain artifact) to continue from: domain fine-tuning"}),
        "--strategy": ("train.strategy", {"choices": ["ddp", "fsdp", "none"], "help": "data-parallel strategy"}),
        "--num-workers": ("train.num_workers", {"type": int, "help": "Ray Train workers"}),
        "--use-gpu": ("train.use_gpu", {"action": "store_const", "const": True,
                                        "help": "one GPU per worker (default: GPUs if the cluster has them)"}),
        "--steps": ("train.steps", {"type": int, "help": "optimizer steps"}),
        "--seq-len": ("seq_len", {"type": int, "help": "tokens per row (default: the dataset's)"}),
        "--overwrite": ("overwrite", {"action": "store_const", "const": True,
                                      "help": "replace a finished artifact at --out"}),
    }, description=pretrain.__doc__.split("\n\n")[0])
    p.set_defaults(func=_cli)


def _cli(args: argparse.Namespace) -> int:
    from cluster.cli import config_from_args

    config = config_from_args(pretrain.PretrainConfig, "pretrain", args)
    result = pretrain.run(config, address=args.address)
    m = result.metrics
    print(f"pretrain: {result.steps} steps, loss {m.get('loss', float('nan')):.4f}, "
          f"val_loss {m.get('val_loss', float('nan')):.4f} (ppl {m.get('val_ppl', float('nan')):.1f}), "
          f"{m.get('tokens_per_s', 0):.0f} tokens/s, MFU {100 * m.get('mfu', 0):.1f}%")
    print(f"model: {result.model_dir}")
    return 0

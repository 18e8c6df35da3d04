"""Training throughput: genloop's Ray Train loop (2 workers x 1 thread, DDP and FSDP2) vs a plain single-process
PyTorch loop (2 threads) on the same model, global batch and machine. Prints tokens/s of each; the LAST line is the
ratio genloop / plain for DDP and FSDP2 (goal >= 0.9).

    python bench/train_bench.py [--model demo] [--steps 25] [--micro 8] [--seq 256] [--vocab 2048] [--repeats 2]

Both sides run the same global batch per optimizer step (2 x micro rows of seq tokens), AdamW, clipping and the
token-mean cross-entropy. Each side's tokens/s is the median over windows of ``--warmup`` steps after a warm-up
window. The sides run interleaved, ``--repeats`` rounds (plain, DDP, FSDP2, then the next round); the best round of
each side counts (this machine is shared: a disturbed round is only ever slower). Ray is up (idle) in every
round, the plain ones included.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch
import torch.nn.functional as F


def plain_loop(build, blocks: np.ndarray, micro_rows: int, steps: int, warmup: int, threads: int) -> float:
    """tokens/s of the simplest single-process loop on ``threads`` threads: the median over windows of ``warmup``
    steps, the first window (warm-up) left out."""
    torch.set_num_threads(threads)
    model = build()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    x = torch.from_numpy(blocks[:, :-1].astype(np.int64))
    y = torch.from_numpy(blocks[:, 1:].astype(np.int64))
    n = len(x) // micro_rows
    windows: list[float] = []
    t0, tokens = time.perf_counter(), 0
    for step in range(steps + warmup):
        if step and step % warmup == 0:
            windows.append(tokens / (time.perf_counter() - t0))
            t0, tokens = time.perf_counter(), 0
        i = step % n
        xb, yb = x[i * micro_rows : (i + 1) * micro_rows], y[i * micro_rows : (i + 1) * micro_rows]
        loss = F.cross_entropy(model(xb).flatten(0, 1), yb.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens += xb.numel()
    windows.append(tokens / (time.perf_counter() - t0))
    return float(np.median(windows[1:]))


def genloop_loop(
    build, blocks: np.ndarray, strategy: str, micro: int, steps: int, warmup: int, reshard: str = "default"
) -> float:
    """tokens/s of ``fit`` with 2 workers x 1 thread (median over log windows after the warm-up window)."""
    import ray.data

    from pipelines.train.loop import TrainLoopConfig, fit

    ds = ray.data.from_numpy(blocks[:, :-1].astype(np.int32)).rename_columns({"data": "input_ids"})
    ds = ds.zip(ray.data.from_numpy(blocks[:, 1:].astype(np.int32)).rename_columns({"data": "labels"}))
    cfg = TrainLoopConfig(
        steps=warmup + steps,
        micro_batch_size=micro,
        lr=1e-3,
        warmup_steps=1,
        strategy=strategy,
        num_workers=2,
        cpus_per_worker=1,
        log_every=warmup,
        eval_every=10**9,
        ckpt_every=0,
        name=f"bench-{strategy}",
        progress=False,
        fsdp_reshard_after_forward=reshard,
    )
    with tempfile.TemporaryDirectory() as out:
        r = fit(cfg, build, ds, None, out)
    windows = [h["tokens_per_s"] for h in r.history if "tokens_per_s" in h][1:]  # drop the warm-up window
    return float(np.median(windows))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="demo")
    ap.add_argument("--steps", type=int, default=25, help="timed steps after the warm-up (a multiple of --warmup)")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--micro", type=int, default=8, help="rows per worker per step (plain loop: 2x this)")
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--only", choices=["ddp", "fsdp"], default=None)
    ap.add_argument("--repeats", type=int, default=2, help="interleaved rounds; the best round of each side counts")
    ap.add_argument(
        "--fsdp-reshard",
        choices=["default", "always", "never"],
        default="default",
        help="train.fsdp_reshard_after_forward for the FSDP2 run",
    )
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    from cluster.runtime import init_ray
    from models.transformer import Transformer, model_preset

    mcfg = model_preset(args.model).for_tokenizer(args.vocab)
    mcfg.max_seq_len = max(mcfg.max_seq_len, args.seq)

    def build():
        torch.manual_seed(0)
        return Transformer(mcfg)

    rows = 2 * args.micro * 8
    blocks = np.random.default_rng(0).integers(0, args.vocab, size=(rows, args.seq + 1))
    print(
        f"model {args.model} ({mcfg.num_params() / 1e6:.1f}M params), global batch {2 * args.micro} x {args.seq} "
        f"tokens, {args.steps} timed steps, {args.repeats} rounds, {os.cpu_count()} CPUs"
    )
    init_ray()
    strategies = [args.only] if args.only else ["ddp", "fsdp"]
    best: dict[str, float] = {}
    for rnd in range(args.repeats):
        got = {"plain": plain_loop(build, blocks, 2 * args.micro, args.steps, args.warmup, threads=2)}
        for strategy in strategies:
            got[strategy] = genloop_loop(
                build, blocks, strategy, args.micro, args.steps, args.warmup, args.fsdp_reshard
            )
        print(
            f"round {rnd + 1}: plain PyTorch 1 process x 2 threads {got['plain']:.0f} tokens/s; "
            + "; ".join(
                f"genloop Ray Train {k} 2 workers x 1 thread {got[k]:.0f} ({got[k] / got['plain']:.2f}x)"
                for k in strategies
            ),
            flush=True,
        )
        for k, v in got.items():
            best[k] = max(best.get(k, 0.0), v)
    print(f"best rounds: plain {best['plain']:.0f} tokens/s; " + "; ".join(f"{k} {best[k]:.0f}" for k in strategies))
    print("ratio genloop/plain tokens/s: " + ", ".join(f"{k} {best[k] / best['plain']:.2f}x" for k in strategies))


if __name__ == "__main__":
    main()

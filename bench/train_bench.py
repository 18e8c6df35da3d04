"""Training throughput: genloop's Ray Train loop (2 workers x 1 thread, DDP and FSDP2; or ``--workers 1``) vs a plain single-process
PyTorch loop (2 threads) on the same model, global batch and machine. Prints tokens/s of each; the LAST line is the
ratio genloop / plain for DDP and FSDP2 (goal >= 0.9).

    python bench/train_bench.py [--model demo] [--steps 25] [--micro 8] [--seq 256] [--vocab 2048] [--repeats 2]
    python bench/train_bench.py --model smollm2 --dtype fp32 --workers 1   # the real model as its preset runs

Both sides run the same global batch per optimizer step (2 x micro rows of seq tokens), AdamW, clipping and the
token-mean cross-entropy. Each side's tokens/s is the median over windows of ``--warmup`` steps after a warm-up
window. The sides run interleaved, ``--repeats`` rounds (plain, DDP, FSDP2, then the next round); the best round of
each side counts (this machine is shared: a disturbed round is only ever slower). Ray is up (idle) in every
round, the plain ones included.

On a real pretrained model (``--model smollm2``: the packaged SmolLM2-135M-Instruct, imported once; or ``--model
PATH``: an imported model folder) both sides train genloop's model loaded from that folder, on random ids of its
vocabulary, in ``--dtype fp32`` and ``bf16`` (CPU autocast around the forward, logits back to fp32 for the loss, on
both sides alike: the training loop has no dtype option yet). Defaults there are sized for 2 cores: DDP only,
``--seq 128 --micro 2 --steps 6 --warmup 2 --repeats 1``. The LAST line is the ratio per strategy and dtype::

    python bench/train_bench.py --model smollm2 [--dtype fp32,bf16] [--steps 6] [--micro 2] [--seq 128]
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


def with_autocast(model: torch.nn.Module, dtype: str) -> torch.nn.Module:
    """``dtype`` bf16: the model's forward under CPU autocast, its logits back in fp32 for the loss (what a training
    loop with a bf16 autocast option does); fp32: the model as it is. Parameters, gradients and AdamW stay fp32."""
    if dtype == "fp32":
        return model
    forward = model.forward

    def autocast_forward(*args, **kwargs):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return forward(*args, **kwargs).float()

    model.forward = autocast_forward  # an instance attribute: the state dict's names stay the model's
    return model


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
    build,
    blocks: np.ndarray,
    strategy: str,
    micro: int,
    steps: int,
    warmup: int,
    reshard: str = "default",
    workers: int = 2,
) -> float:
    """tokens/s of ``fit`` with ``workers`` workers sharing the 2 CPUs (2 x 1 thread, or 1 x 2 threads; the global
    batch is the same: 2 x ``micro`` rows per step, one micro-batch of them on one worker, as the plain loop), median
    over log windows after the warm-up window."""
    import ray.data

    from pipelines.train.loop import TrainLoopConfig, fit

    ds = ray.data.from_numpy(blocks[:, :-1].astype(np.int32)).rename_columns({"data": "input_ids"})
    ds = ds.zip(ray.data.from_numpy(blocks[:, 1:].astype(np.int32)).rename_columns({"data": "labels"}))
    cfg = TrainLoopConfig(
        steps=warmup + steps,
        micro_batch_size=micro * (2 // workers),
        grad_accum=1,
        lr=1e-3,
        warmup_steps=1,
        strategy=strategy,
        num_workers=workers,
        cpus_per_worker=2 // workers,
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
    ap.add_argument(
        "--model",
        default="demo",
        help="a genloop model preset (random init), or a real model: smollm2 (the packaged SmolLM2-135M-Instruct) "
        "or an imported model folder",
    )
    ap.add_argument(
        "--steps",
        type=int,
        default=None,
        help="timed steps after the warm-up (a multiple of --warmup; default 25, a real model 6)",
    )
    ap.add_argument("--warmup", type=int, default=None, help="default 5, a real model 2")
    ap.add_argument(
        "--micro",
        type=int,
        default=None,
        help="rows per worker per step (plain loop: 2x this; default 8, a real model 2)",
    )
    ap.add_argument("--seq", type=int, default=None, help="default 256, a real model 128")
    ap.add_argument("--vocab", type=int, default=2048, help="a preset model's vocabulary (a real model: its own)")
    ap.add_argument("--dtype", default=None, help="fp32, bf16 or both (fp32,bf16; default: fp32, a real model both)")
    ap.add_argument(
        "--only", choices=["ddp", "fsdp"], default=None, help="one strategy (a real model: ddp unless --only fsdp)"
    )
    ap.add_argument(
        "--workers",
        type=int,
        choices=[1, 2],
        default=2,
        help="Ray Train workers on the 2 CPUs: 2 x 1 thread (gradients all-reduced every step), or 1 x 2 threads "
        "(the layout configs/smollm2.yaml runs; one micro-batch of 2 x --micro rows, as the plain loop)",
    )
    ap.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="interleaved rounds; the best round of each side counts (default 2, a real model 1)",
    )
    ap.add_argument(
        "--fsdp-reshard",
        choices=["default", "always", "never"],
        default="default",
        help="train.fsdp_reshard_after_forward for the FSDP2 run",
    )
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    from bench.real_model import is_real_model, resolve_model
    from cluster.runtime import init_ray

    real = is_real_model(args.model)
    defaults = (
        dict(steps=6, warmup=2, micro=2, seq=128, repeats=1)
        if real
        else dict(steps=25, warmup=5, micro=8, seq=256, repeats=2)
    )
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    dtypes = (args.dtype or ("fp32,bf16" if real else "fp32")).split(",")
    if any(d not in ("fp32", "bf16") for d in dtypes):
        ap.error(f"--dtype {args.dtype}: use fp32, bf16 or fp32,bf16")

    if real:
        from models.checkpoint import load_checkpoint, load_config

        path = resolve_model(args.model)
        mcfg = load_config(path)
        vocab = mcfg.vocab_size

        def load():
            return load_checkpoint(path)[0]
    else:
        from models.transformer import Transformer, model_preset

        mcfg = model_preset(args.model).for_tokenizer(args.vocab)
        mcfg.max_seq_len = max(mcfg.max_seq_len, args.seq)
        vocab = args.vocab

        def load():
            torch.manual_seed(0)
            return Transformer(mcfg)

    def builder(dtype: str):
        def build():
            return with_autocast(load(), dtype)

        return build

    rows = 2 * args.micro * 8
    blocks = np.random.default_rng(0).integers(0, vocab, size=(rows, args.seq + 1))
    print(
        f"model {args.model} ({mcfg.num_params() / 1e6:.1f}M params), global batch {2 * args.micro} x {args.seq} "
        f"tokens, {args.steps} timed steps, {args.repeats} rounds, dtypes {','.join(dtypes)}, {os.cpu_count()} CPUs"
    )
    init_ray()
    strategies = [args.only] if args.only else (["ddp"] if real else ["ddp", "fsdp"])
    best: dict[str, float] = {}
    for rnd in range(args.repeats):
        for dtype in dtypes:
            build = builder(dtype)
            got = {"plain": plain_loop(build, blocks, 2 * args.micro, args.steps, args.warmup, threads=2)}
            for strategy in strategies:
                got[strategy] = genloop_loop(
                    build, blocks, strategy, args.micro, args.steps, args.warmup, args.fsdp_reshard, args.workers
                )
            print(
                f"round {rnd + 1} {dtype}: plain PyTorch 1 process x 2 threads {got['plain']:.0f} tokens/s; "
                + "; ".join(
                    f"genloop Ray Train {k} {args.workers} x {2 // args.workers} thread(s) {got[k]:.0f} ({got[k] / got['plain']:.2f}x)"
                    for k in strategies
                ),
                flush=True,
            )
            for k, v in got.items():
                best[f"{k} {dtype}"] = max(best.get(f"{k} {dtype}", 0.0), v)
    print("best rounds (tokens/s): " + "; ".join(f"{k} {v:.0f}" for k, v in best.items()))
    print(
        "ratio genloop/plain tokens/s: "
        + ", ".join(f"{k} {d} {best[f'{k} {d}'] / best[f'plain {d}']:.2f}x" for d in dtypes for k in strategies)
    )


if __name__ == "__main__":
    main()

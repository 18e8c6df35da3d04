"""The streaming training loader on a corpus and on the same corpus 8x larger: peak RSS per training worker,
tokens/s, and bytes read per worker per epoch against the split's size. The LAST lines are the ratios 8x / 1x
(goals: peak RSS <= 1.15, tokens/s >= 0.9) and bytes read per worker per epoch / split size (goal about 1 / workers).

    python bench/loader_bench.py [--data runs/demo/data] [--copies 8] [--steps 30] [--workers 2] [--repeats 3]
    (cd OLD && python /path/to/bench/loader_bench.py --code OLD)   # the same bench on another checkout's loop

``--code DIR`` measures the training loop of another genloop checkout (run it from that folder so Ray's workers
import the same code), e.g. a worktree of the commit before the loader: the old path, measured the same way.

Both runs are ``genloop pretrain``'s path: the data stage's Parquet token blocks read by Ray Data into
``input_ids``/``labels`` rows, the shared loop (``fit``) with the demo model, DDP on ``--workers`` workers x 1 thread,
the demo's micro-batch. The 8x corpus is the blocks repeated (Parquet files copied ``--copies`` times under /tmp).
Rounds are interleaved (1x, 8x, then the next round) and every round is printed; tokens/s is each side's median
over rounds. Peak RSS is rank 0's ``ru_maxrss`` (the loop logs it), the largest over rounds; bytes read are what the rank asked the row store for; "waiting for data" is the share of
the step time the loop blocked on the loader (its read-ahead keeping up = ~0, whatever the machine's load).

The path this replaced (every worker reads the whole split through Ray Data and keeps 1/N of the rows) measured, in
issue 14, 1,048 MB on the demo data and 2,375 MB on eight copies (2 workers, 30 steps): +127%.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _code_root() -> Path:
    """``--code DIR``: the checkout whose pipelines are measured (default: this one)."""
    if "--code" in sys.argv[:-1]:
        return Path(sys.argv[sys.argv.index("--code") + 1]).resolve()
    return Path(__file__).resolve().parent.parent


sys.path.insert(0, str(_code_root()))


def repeat_split(src: str, copies: int, out: Path) -> str:
    """A bigger split: the Parquet files of ``src`` copied ``copies`` times into ``out`` (new names, same blocks)."""
    files = sorted(f for f in os.listdir(src) if f.endswith(".parquet"))
    if not files:
        raise SystemExit(f"{src} has no Parquet files; make data with `genloop data --config demo --out DIR`")
    out.mkdir(parents=True, exist_ok=True)
    for c in range(copies):
        for i, f in enumerate(files):
            shutil.copyfile(os.path.join(src, f), out / f"part-{c:03d}-{i:05d}.parquet")
    return str(out)


def run_once(split: str, seq_len: int, n_vocab: int, args: argparse.Namespace, tag: str) -> dict[str, float]:
    import ray.data

    from models.transformer import Transformer, model_preset
    from pipelines.blocks import TOKENS
    from pipelines.pretrain.stage import lm_rows
    from pipelines.train.loop import TrainLoopConfig, fit

    mcfg = model_preset(args.model).for_tokenizer(n_vocab)

    def build() -> Transformer:
        return Transformer(mcfg)

    ds = ray.data.read_parquet(split, columns=[TOKENS]).map_batches(
        lm_rows, fn_kwargs={"seq_len": seq_len}, batch_format="numpy"
    )
    cfg = TrainLoopConfig(
        steps=args.steps,
        micro_batch_size=args.micro,
        lr=1e-3,
        warmup_steps=1,
        strategy="ddp",
        num_workers=args.workers,
        cpus_per_worker=1,
        log_every=args.window,
        eval_every=10**9,
        ckpt_every=0,
        name=f"loader-{tag}",
        progress=False,
    )
    with tempfile.TemporaryDirectory(prefix="loader-bench-") as out:
        t0 = time.perf_counter()
        r = fit(cfg, build, ds, None, out)
        wall = time.perf_counter() - t0
        from pipelines.train import loop as train_loop

        if hasattr(train_loop, "stage_rows"):  # the loader: the run's row store says what the split is
            from pipelines.train.config import RUNS_DIR
            from pipelines.train.row_store import RowStore, store_path

            store = RowStore(store_path(os.path.join(out, RUNS_DIR), cfg.name, "train"))
            split_bytes, n_rows = store.nbytes(), len(store)
        else:  # a checkout before the loader (--code): every worker reads the whole split
            n_rows = ds.count()
            split_bytes = n_rows * 2 * seq_len * 4  # the same int32 input_ids + labels rows
    logged = [h for h in r.history if "tokens_per_s" in h]
    tps = float(np.median([h["tokens_per_s"] for h in logged[1:]] or [logged[-1]["tokens_per_s"]]))
    consumed = args.steps * cfg.global_rows()
    read = float(logged[-1].get("data_bytes_read", split_bytes * consumed / n_rows))
    wait = float(np.mean([h.get("data_wait_frac", np.nan) for h in logged[1:] or logged[-1:]]))
    return {
        "rows": n_rows,
        "split_mb": split_bytes / 1e6,
        "peak_rss_mb": max(h["peak_memory_bytes"] for h in logged) / 1e6,
        "tokens_per_s": tps,
        "data_wait_frac": wait,
        "read_per_epoch_mb": read * n_rows / consumed / 1e6,
        "read_fraction": read * n_rows / consumed / split_bytes,
        "wall_s": wall,
    }


def summarize(ms: list[dict[str, float]]) -> dict[str, float]:
    """One side over its rounds: the median tokens/s (a shared machine's noise goes both ways between interleaved
    rounds), the largest peak RSS, the mean data-wait share; rows and bytes are the same every round."""
    out = dict(ms[-1])
    out["tokens_per_s"] = float(np.median([m["tokens_per_s"] for m in ms]))
    out["peak_rss_mb"] = max(m["peak_rss_mb"] for m in ms)
    out["data_wait_frac"] = float(np.mean([m["data_wait_frac"] for m in ms]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="runs/demo/data", help="a genloop tokenized dataset folder")
    ap.add_argument("--copies", type=int, default=8)
    ap.add_argument("--model", default="demo")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--window", type=int, default=5, help="steps per tokens/s window (the first is the warm-up)")
    ap.add_argument("--micro", type=int, default=4)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--cpus",
        type=int,
        default=0,
        help="Ray's CPUs (default workers + 2: the old path's workers run Ray Data read tasks beside them)",
    )
    ap.add_argument("--code", default="", help="measure another genloop checkout's training loop (run from there)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

    import pipelines.train.loop
    from cluster.runtime import init_ray
    from pipelines.blocks import open_dataset

    print(f"measuring the training loop of {pipelines.train.loop.__file__}", flush=True)
    info = open_dataset(os.path.abspath(args.data))
    n_vocab = info.load_tokenizer().n_vocab
    init_ray(num_cpus=args.cpus or args.workers + 2)
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    with tempfile.TemporaryDirectory(prefix="loader-bench-data-", dir="/tmp") as tmp:
        splits = {"1x": info.train, f"{args.copies}x": repeat_split(info.train, args.copies, Path(tmp) / "train")}
        rounds: dict[str, list[dict[str, float]]] = {tag: [] for tag in splits}
        for rnd in range(args.repeats):
            for tag, split in splits.items():
                m = run_once(split, info.seq_len, n_vocab, args, tag)
                print(f"round {rnd + 1} {tag}: " + ", ".join(f"{k} {v:,.3f}" for k, v in m.items()), flush=True)
                rounds[tag].append(m)
    best = {tag: summarize(ms) for tag, ms in rounds.items()}
    small, big = best["1x"], best[f"{args.copies}x"]
    for tag, m in best.items():
        if np.isnan(m["data_wait_frac"]):
            print(f"{tag:>4}: (a checkout before the loader: every worker reads the whole split, read = split)")
        print(
            f"{tag:>4}: {m['rows']:,.0f} rows, split {m['split_mb']:.1f} MB; peak RSS per worker "
            f"{m['peak_rss_mb']:.0f} MB; {m['tokens_per_s']:,.0f} tokens/s (waiting for data "
            f"{100 * m['data_wait_frac']:.2f}% of the time); read per worker per epoch "
            f"{m['read_per_epoch_mb']:.1f} MB ({m['read_fraction']:.3f} of the split)"
        )
    print(f"peak RSS {args.copies}x / 1x: {big['peak_rss_mb'] / small['peak_rss_mb']:.3f} (goal <= 1.15)")
    print(f"tokens/s {args.copies}x / 1x: {big['tokens_per_s'] / small['tokens_per_s']:.3f} (goal >= 0.90)")
    print(
        f"bytes read per worker per epoch / split: 1x {small['read_fraction']:.3f}, {args.copies}x "
        f"{big['read_fraction']:.3f} (goal about 1/{args.workers} = {1 / args.workers:.3f})"
    )


if __name__ == "__main__":
    main()

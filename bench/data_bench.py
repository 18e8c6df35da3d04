"""Data-stage benchmark: genloop against its baselines on the same documents, in one run, on the same cores.

(a) tokenize + pack (genloop's ``Tokenize`` UDF on Arrow batches + ``BlockPacker`` cutting seq_len+1 blocks, shards
    written) against raw tiktoken ``encode_ordinary_batch`` on the same texts (goal >= 0.8x);
(b) MinHash signatures from raw text (word 5-grams, 112 permutations): genloop's vectorised numpy MinHash against
    ``datasketch`` (goal >= 3x) and ``rensa`` (Rust) when it is installed — baselines get the same shingles;
(c) the whole ``genloop data`` pipeline (embedded Ray) in MB/s of input.

Usage: ``python bench/data_bench.py [--mb 4] [--no-pipeline]``. The last line prints the ratios.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pyarrow as pa  # noqa: E402

from pipelines.blocks import BlockPacker, Tokenize, pack_batch  # noqa: E402
from pipelines.data.dedup import MinHashConfig, permutations, text_signature  # noqa: E402
from pipelines.data.stage import DataConfig, run, stdlib_files  # noqa: E402

_WORDS = re.compile(r"\w+")


def corpus(mb: float) -> tuple[list[str], list[str]]:
    """(files, texts): stdlib .py sources in path order until ``mb`` megabytes."""
    files, texts, total = [], [], 0
    for f in stdlib_files([".py"]):
        t = Path(f).read_text(errors="replace")
        files.append(f)
        texts.append(t)
        total += len(t.encode())
        if total >= mb * 1e6:
            break
    return files, texts


def best_of(*fns, repeat: int = 3) -> list[float]:
    """Best wall time of each function, runs interleaved (a b c a b c ...) so load changes hit all alike."""
    times = [[] for _ in fns]
    for _ in range(repeat):
        for i, fn in enumerate(fns):
            t = time.perf_counter()
            fn()
            times[i].append(time.perf_counter() - t)
    return [min(t) for t in times]


def bench_tokenize(texts: list[str], mb: float) -> float:
    from models.tokenizer import Tokenizer

    tok = Tokenizer.load("cl100k_base")
    n_threads = 8

    def baseline() -> None:
        tok.enc.encode_ordinary_batch(texts, num_threads=n_threads)

    table = pa.table(
        {
            "key": [f"k{i}" for i in range(len(texts))],
            "status": ["kept"] * len(texts),
            "text": texts,
            "hash": list(range(len(texts))),
        }
    )
    udf = Tokenize(tok, frozenset(), 0.05)

    def genloop() -> None:
        with tempfile.TemporaryDirectory() as tmp:
            packers = {s: BlockPacker(f"{tmp}/{s}", 256, 8192) for s in ("train", "val")}
            for lo in range(0, len(texts), 256):
                pack_batch(udf(table.slice(lo, 256)), packers)
            for p in packers.values():
                p.close()

    t_base, t_ours = best_of(baseline, genloop)
    print(
        f"(a) tokenize: tiktoken encode_ordinary_batch {mb / t_base:.2f} MB/s; genloop tokenize+pack "
        f"{mb / t_ours:.2f} MB/s -> {t_base / t_ours:.2f}x"
    )
    return t_base / t_ours


def bench_minhash(texts: list[str], mb: float) -> tuple[float, float | None]:
    import datasketch

    cfg = MinHashConfig()
    perms = permutations(cfg.num_perm, cfg.seed)

    def ours() -> None:
        for t in texts:
            text_signature(t, cfg, perms)

    def shingles(t: str) -> list[str]:
        w = _WORDS.findall(t.lower())
        return [" ".join(w[i : i + cfg.ngram]) for i in range(max(1, len(w) - cfg.ngram + 1))]

    def ds() -> None:
        for t in texts:
            m = datasketch.MinHash(num_perm=cfg.num_perm, seed=1)
            m.update_batch([s.encode() for s in shingles(t)])
            m.digest()

    try:
        import rensa
    except ImportError:
        rensa = None

    def rs() -> None:
        for t in texts:
            m = rensa.RMinHash(num_perm=cfg.num_perm, seed=1)
            m.update(shingles(t))
            m.digest()

    t_ours, t_ds, *t_rs = best_of(ours, ds, *([rs] if rensa else []))
    print(f"(b) minhash: genloop {mb / t_ours:.2f} MB/s; datasketch {mb / t_ds:.2f} MB/s -> {t_ds / t_ours:.2f}x")
    if not t_rs:
        print("(b) minhash: rensa not installed (pip install rensa) -> skipped")
        return t_ds / t_ours, None
    print(f"(b) minhash: rensa {mb / t_rs[0]:.2f} MB/s -> genloop/rensa {t_rs[0] / t_ours:.2f}x")
    return t_ds / t_ours, t_rs[0] / t_ours


def bench_pipeline(files: list[str], mb: float) -> float:
    from cluster.runtime import init_ray

    init_ray()  # stages take a running Ray; a bench script is an edge and starts it
    with tempfile.TemporaryDirectory() as tmp:
        cfg = DataConfig(input=files, out=f"{tmp}/out", tokenizer="cl100k_base", seq_len=256)
        t = time.perf_counter()
        counts = run(cfg)
        secs = time.perf_counter() - t
    print(
        f"(c) pipeline: {len(files)} files, {mb:.1f} MB in {secs:.1f} s -> {mb / secs:.2f} MB/s "
        f"(kept {counts['kept']}/{counts['read']} docs; stage timings {counts['metrics']['timings_s']})"
    )
    return mb / secs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mb", type=float, default=4.0, help="megabytes of stdlib source to use")
    p.add_argument("--no-pipeline", action="store_true", help="skip (c), which starts an embedded Ray")
    args = p.parse_args()
    files, texts = corpus(args.mb)
    mb = sum(len(t.encode()) for t in texts) / 1e6
    print(f"corpus: {len(texts)} stdlib files, {mb:.2f} MB")
    tok_ratio = bench_tokenize(texts, mb)
    ds_ratio, rs_ratio = bench_minhash(texts, mb)
    pipe = None if args.no_pipeline else bench_pipeline(files, mb)
    rs = f"{rs_ratio:.2f}x" if rs_ratio is not None else "n/a"
    pl = f"{pipe:.2f} MB/s" if pipe is not None else "skipped"
    print(
        f"data_bench: tokenize+pack/tiktoken {tok_ratio:.2f}x (goal 0.8); minhash/datasketch {ds_ratio:.2f}x "
        f"(goal 3); minhash/rensa {rs}; pipeline {pl}"
    )


if __name__ == "__main__":
    main()

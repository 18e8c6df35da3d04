"""genloop tokenizer throughput against raw tiktoken on the same text (the wrapper must cost <= 10%).

Measures per-document ``encode`` and ``encode_batch`` for a BPE trained here and for cl100k_base, each against the
underlying ``tiktoken.Encoding`` called directly, interleaving runs so machine noise hits both alike.
Last line: the worst genloop/tiktoken throughput ratio.
"""

from __future__ import annotations

import glob
import sysconfig
import time
from pathlib import Path

from models.tokenizer import Tokenizer, train


def corpus(max_bytes: int = 8_000_000) -> list[str]:
    texts, total = [], 0
    for f in sorted(glob.glob(str(Path(sysconfig.get_paths()["stdlib"]) / "**" / "*.py"), recursive=True)):
        t = Path(f).read_text(errors="replace")
        texts.append(t)
        total += len(t.encode())
        if total >= max_bytes:
            break
    return texts


def best_of(fn, repeats: int = 5) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    texts = corpus()
    mb = sum(len(t.encode()) for t in texts) / 1e6
    t0 = time.perf_counter()
    trained = train(texts[:400], vocab_size=8192)
    print(f"trained an 8192-token BPE on 400 files in {time.perf_counter() - t0:.1f}s; bench text {mb:.1f} MB")
    ratios = []
    for tok in (trained, Tokenizer.load("cl100k_base")):
        raw = tok.enc
        cases = {
            "encode (per doc)": (
                lambda tok=tok: [tok.encode(t) for t in texts],
                lambda raw=raw: [raw.encode_ordinary(t) for t in texts],
            ),
            "encode_batch": (
                lambda tok=tok: tok.encode_batch(texts),
                lambda raw=raw: raw.encode_ordinary_batch(texts, num_threads=8),
            ),
        }
        for name, (ours, base) in cases.items():
            assert ours() == base()
            g, b = [], []
            for _ in range(3):  # interleave
                g.append(best_of(ours, 1))
                b.append(best_of(base, 1))
            ratio = min(b) / min(g)
            ratios.append(ratio)
            print(
                f"{tok.name:14s} {name:17s} genloop {mb / min(g):6.2f} MB/s  tiktoken {mb / min(b):6.2f} MB/s  "
                f"ratio {ratio:.3f}"
            )
    print(f"genloop/tiktoken throughput ratio (worst case): {min(ratios):.3f}")


if __name__ == "__main__":
    main()

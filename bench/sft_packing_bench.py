"""Packing vs padding for SFT: answer tokens trained per second (forward + backward + AdamW step) on the same samples.

Samples come from ``genloop sft-data`` on the embedded stdlib corpus, rendered with the ChatML template and a BPE
trained on the stdlib; the model is the ``demo`` preset (random init: speed does not depend on the weights). Both
layouts see the same samples with the same batch size in rows; the loss is identical (tests/test_sft_data.py).

    python bench/sft_packing_bench.py [--model demo] [--seq-len 256] [--samples 512] [--batch 8]

Prints fill ratios (share of positions holding a real token), tokens/s for both layouts, and, last, the ratio
packed/padded of answer tokens per second.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from models.chat import ChatFormat  # noqa: E402
from models.tokenizer import train as train_bpe  # noqa: E402
from models.transformer import Transformer, model_preset  # noqa: E402
from pipelines.sft.data import SftDataConfig, build  # noqa: E402
from pipelines.sft.rows import encode_samples, fill_ratio, make_rows  # noqa: E402
from pipelines.train.loop import IGNORE  # noqa: E402


def tokens_per_s(model: Transformer, rows: dict, batch: int, max_steps: int, pad_id: int) -> tuple[float, float]:
    """(answer tokens / s, real tokens / s) of training steps over ``rows`` (first step is warm-up, not timed)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    t = {k: torch.as_tensor(v) for k, v in rows.items()}
    n = len(t["input_ids"])
    steps = list(range(0, n, batch))[: max_steps + 1]
    answer = real = 0
    start = 0.0
    for j, i in enumerate(steps):
        if j == 1:
            start = time.perf_counter()
        b = {k: v[i : i + batch] for k, v in t.items()}
        logits = model(b["input_ids"], position_ids=b.get("position_ids"), doc_ids=b.get("doc_ids"))
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), b["labels"].flatten(), ignore_index=IGNORE)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if j >= 1:
            answer += int((b["labels"] != IGNORE).sum())
            real += int((b["doc_ids"] >= 0).sum()) if "doc_ids" in b else int((b["input_ids"] != pad_id).sum())
    dt = time.perf_counter() - start
    return answer / dt, real / dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="demo")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--samples", type=int, default=512)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=12, help="timed steps per layout")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    train, _, _ = build(SftDataConfig(max_examples=args.samples, val_fraction=0.0))
    from pipelines.data.inputs import stdlib_files

    tok = train_bpe([Path(f).read_text(errors="replace") for f in stdlib_files([".py"])[:60]], vocab_size=4096)
    convs = [ex["messages"] for ex in train]
    counts: Counter = Counter()
    samples = encode_samples(convs, tok, ChatFormat(), args.seq_len, "assistant", "cut", counts)
    lens = sorted(len(s.input_ids) for s in samples)
    print(
        f"{len(samples)} samples, length median {lens[len(lens) // 2]} max {lens[-1]}, seq_len {args.seq_len}, "
        f"{dict(counts)}"
    )

    results = {}
    for pack in (False, True):
        torch.manual_seed(0)
        model = Transformer(model_preset(args.model).for_tokenizer(tok.n_vocab))
        rows = make_rows(samples, args.seq_len, tok.pad_id, pack)
        fill = fill_ratio(rows, samples)
        # the same number of timed samples for both layouts would favour neither; we time the same number of steps
        ans, real = tokens_per_s(model, rows, args.batch, args.steps, tok.pad_id)
        name = "packed" if pack else "padded"
        results[name] = ans
        print(
            f"{name}: {len(rows['input_ids'])} rows, fill {fill:.1%} (wasted {1 - fill:.1%}), "
            f"{ans:.0f} answer tok/s, {real:.0f} real tok/s"
        )
    print(f"packed/padded answer tokens per second: {results['packed'] / results['padded']:.2f}x")


if __name__ == "__main__":
    main()

"""Helpers more than one test file uses: the embedded corpus, planted texts for the data rules, a tokenized dataset
built by hand, a free port, the served app's API keys, a tiny model builder, planted preference pairs, and model
weights to compare. Fixtures stay in ``conftest.py``."""

from __future__ import annotations

import glob
import json
import random
import socket
import sysconfig
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

STDLIB = Path(sysconfig.get_paths()["stdlib"])


def stdlib_texts(n: int = 60) -> list[str]:
    """A small, deterministic slice of the embedded default corpus."""
    files = sorted(glob.glob(str(STDLIB / "*.py")))[:n]
    return [Path(f).read_text(errors="replace") for f in files]


SERVE_KEYS = ("key-alpha-123", "key-bravo-456")  # API keys (two: memory is private per key)
SERVE_ADMIN_KEY = "admin-key-456"


def make_dataset(out: Path, tok, texts: list[str], seq_len: int, val_blocks: int = 4) -> Path:
    """A genloop tokenized dataset folder (blocks.py contract): documents joined by <|endoftext|>, cut into
    seq_len + 1 blocks, the last ``val_blocks`` held out."""
    from pipelines.artifacts import Manifest
    from pipelines.blocks import write_shard

    ids: list[int] = []
    for doc in tok.encode_batch(texts):
        ids += doc + [tok.eot_id]
    n = len(ids) // (seq_len + 1)
    blocks = np.asarray(ids[: n * (seq_len + 1)], dtype=np.int32).reshape(n, seq_len + 1)
    train, val = blocks[: n - val_blocks], blocks[n - val_blocks :]
    m = Manifest.begin("data", str(out), {"seq_len": seq_len})
    half = len(train) // 2
    write_shard(train[:half], str(out / "train"), 0)
    write_shard(train[half:], str(out / "train"), 1)
    write_shard(val, str(out / "val"), 0)
    tok.save(out / "tokenizer")
    m.finish(counts={"train_blocks": len(train), "val_blocks": len(val)})
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# texts that stress a tokenizer: code with tabs/CRLF, non-Latin scripts, emoji, digits, chat specials, empty
VARIED = [
    "def f(x):\n    return x ** 2  # square\n\n\tif x:\r\n        pass\n",
    "Ünïcödé façade — naïve café; 日本語のテキスト, emoji 🙂🚀 and Ελληνικά.",
    "numbers 1234567 3.14159 0x1F and   multiple   spaces   \n\n\n trailing   ",
    "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\nHi!<|im_end|>\n<|endoftext|>",
    "it's we're they'll I'd you've DON'T",
    "",
]


_STOP = ["the", "and", "of", "to", "with", "that", "have", "be"]


def vocabulary(n: int = 3000, seed: int = 0) -> list[str]:
    """Pronounceable pseudo-words of 3..9 letters (unique), so Gopher's word-length and alpha rules pass."""
    rng = np.random.default_rng(seed)
    cons, vows = "bcdfghklmnprstvz", "aeiou"
    out: set[str] = set()
    while len(out) < n:
        k = int(rng.integers(2, 5))
        out.add("".join(cons[rng.integers(len(cons))] + vows[rng.integers(len(vows))] for _ in range(k)))
    return sorted(out)


def prose_words(rng: np.random.Generator, vocab: list[str], n: int) -> list[str]:
    """Random words with a stop word every ~4 words (natural enough for Gopher's and C4's rules)."""
    return [
        _STOP[rng.integers(len(_STOP))] if rng.random() < 0.25 else vocab[rng.integers(len(vocab))] for _ in range(n)
    ]


def render(words: list[str], per_line: int = 12) -> str:
    """Lines of ``per_line`` words, each a sentence ending with a period."""
    lines = [" ".join(words[i : i + per_line]).capitalize() + "." for i in range(0, len(words), per_line)]
    return "\n".join(lines) + "\n"


def edit(words: list[str], k: int, rng: np.random.Generator, vocab: list[str]) -> list[str]:
    """Replace ``k`` words at evenly spread positions (at least 5 apart) by fresh words."""
    out = list(words)
    n = len(out)
    for p in np.linspace(3, n - 4, k).astype(int):
        out[p] = "zq" + vocab[rng.integers(len(vocab))]
    return out


def jaccard(a: list[str], b: list[str], n: int = 5) -> float:
    """True Jaccard of the word n-gram sets, computed without hashing."""
    sa = {tuple(w.lower() for w in a[i : i + n]) for i in range(len(a) - n + 1)}
    sb = {tuple(w.lower() for w in b[i : i + n]) for i in range(len(b) - n + 1)}
    return len(sa & sb) / len(sa | sb)


def tiny_builder(n_vocab: int, seed: int = 0):
    """A builder of the `tiny` preset model for ``n_vocab`` tokens, seeded (the training loop calls it per worker)."""
    import torch

    from models.transformer import Transformer, model_preset

    cfg = model_preset("tiny").for_tokenizer(n_vocab)

    def build():
        torch.manual_seed(seed)
        return Transformer(cfg)

    return build


def model_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    """The tensors of a model folder's ``model.safetensors`` (a causal LM or a reward model)."""
    from safetensors.torch import load_file

    return load_file(str(Path(model_dir) / "model.safetensors"))


def weights_differ(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    """Same tensor names, and at least one tensor differs."""
    import torch

    assert a.keys() == b.keys()
    return any(not torch.equal(a[k], b[k]) for k in a)


def planted_prefs(path: Path, n: int = 160, seed: int = 0) -> Path:
    """Code answers that differ by one operator: ``+`` is always preferred to ``*`` (a planted preference)."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            name = rng.choice(["add", "scale", "shift", "clip", "mix", "join", "merge"]) + "_" + rng.choice("abcdefgh")
            a, b = rng.sample(["x", "y", "z", "n"], 2)
            prompt = f"Write a Python function `def {name}({a}, {b})` that combines them."
            f.write(
                json.dumps(
                    {
                        "prompt": prompt,
                        "chosen": f"def {name}({a}, {b}):\n    return {a} + {b}",
                        "rejected": f"def {name}({a}, {b}):\n    return {a} * {b}",
                    }
                )
                + "\n"
            )
        f.write("{broken json\n")  # counted and quarantined, not fatal
        f.write(json.dumps({"prompt": "no answers"}) + "\n")
    return path


# the toy task's verifiable reward: the share of an answer's characters that are whitespace
TOY_REWARD = """
def whitespace(prompts, responses):
    return [sum(c in " \\n" for c in r) / max(1, len(r)) for r in responses]


def length_mod5(prompts, responses):  # 0/1, 1 about one time in five: many groups of four score all 0
    return [float(len(r) % 5 == 0) for r in responses]


def columns_match(prompts, responses, fname, plus, **others):  # 1 where the row's columns are this answer's prompt's
    assert len(fname) == len(plus) == len(others["meta"]) == len(responses)
    return [float(f"`{f}(x)`" in p and p.endswith(f" plus {k}.") and m == {"task": "write"})
            for p, f, k, m in zip(prompts, fname, plus, others["meta"])]
"""


def sft_data_folder(folder: Path) -> Path:
    """A tiny sft-data artifact (its line format): short code-writing prompts with reference answers, plus an
    explain line (not code-writing: skipped) and a malformed line."""
    from pipelines.sft.data import WRITE_PROMPTS

    folder.mkdir()
    rows = []
    for i, (name, args, body) in enumerate(
        [
            ("inc", "x", "x + 1"),
            ("neg", "x", "-x"),
            ("dbl", "x", "2 * x"),
            ("sq", "x", "x * x"),
            ("half", "x", "x / 2"),
            ("add", "a, b", "a + b"),
            ("sub", "a, b", "a - b"),
            ("mul", "a, b", "a * b"),
        ]
    ):
        prompt = WRITE_PROMPTS[i % len(WRITE_PROMPTS)].format(sig=f"def {name}({args})", doc="Compute it.")
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": prompt},
                    {"role": "assistant", "content": f"def {name}({args}):\n    return {body}"},
                ],
                "meta": {"task": "write"},
            }
        )
    rows.append(
        {
            "messages": [
                {"role": "user", "content": "What does this do?\n```python\nx = 1\n```"},
                {"role": "assistant", "content": "Sets x."},
            ],
            "meta": {"task": "explain"},
        }
    )
    lines = [json.dumps(r) for r in rows] + ["not json"]
    (folder / "train.jsonl").write_text("\n".join(lines[:6] + lines[8:]) + "\n")
    (folder / "val.jsonl").write_text("\n".join(lines[6:8]) + "\n")
    return folder

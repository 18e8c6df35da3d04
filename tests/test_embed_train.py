"""embed-train's parts: the InfoNCE loss against a hand computation, held-out recall, docstring -> code pairs, and a
few steps of the shared training loop (in process, no Ray) raising held-out recall on a toy corpus; for a transformer
checkpoint: mean pooling that ignores pads, ``genloop embed-train --init-from CKPT`` raising held-out recall of the
`tiny` checkpoint on planted sources with its output served as a ``ckpt:`` embedder, and an imported model's own
tokenizer kept."""

from __future__ import annotations

import math

import pytest
import torch

from pipelines.embed.loss import info_nce, recall_at
from pipelines.embed.pairs import held_out, pairs_from_source
from pipelines.embed.train import EmbedTrainConfig, train


def test_info_nce_matches_a_hand_computation():
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])  # unit after normalising: (1, 0), (0, 1)
    p = torch.tensor([[3.0, 4.0], [0.0, -1.0]])  # (0.6, 0.8), (0, -1)
    # cosines: a0.p0 = 0.6, a0.p1 = 0; a1.p0 = 0.8, a1.p1 = -1; x scale 20 -> logits [[12, 0], [16, -20]]
    l0 = -12 + math.log(math.exp(12) + math.exp(0))
    l1 = 20 + math.log(math.exp(16) + math.exp(-20))  # -(-20) + logsumexp
    loss_sum, n = info_nce(a, p, scale=20.0)
    assert n == 2 and float(loss_sum) == pytest.approx(l0 + l1, rel=1e-5)
    loss1, _ = info_nce(a, p, scale=1.0)
    hand = (-0.6 + math.log(math.exp(0.6) + 1)) + (1 + math.log(math.exp(0.8) + math.exp(-1)))
    assert float(loss1) == pytest.approx(hand, rel=1e-5)
    with pytest.raises(ValueError, match="must both be"):
        info_nce(a, p[:1])


def test_recall_at_counts_ranks_by_hand():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    c = torch.tensor([[1.0, 0.0], [1.0, 0.1], [-1.0, -1.0]])  # q0 -> rank 1; q1 -> rank 1 of (0, .1, -1); q2 -> 3
    r = recall_at(q, c, ks=(1, 2))
    assert r["recall@1"] == pytest.approx(2 / 3) and r["recall@2"] == pytest.approx(2 / 3)
    assert r["mrr"] == pytest.approx((1 + 1 + 1 / 3) / 3)


def test_pairs_are_docstring_to_code_without_the_docstring():
    src = '''"""Module docstring: never a pair."""

def parse_header(line):
    """Split one header line into name and value."""
    name, _, value = line.partition(":")
    return name.strip(), value.strip()


class Short:
    """Too few."""
    x = 1
'''
    ps = pairs_from_source(src, "m.py")
    assert [(p.name, p.query) for p in ps] == [("parse_header", "Split one header line into name and value.")]
    assert "Split one" not in ps[0].doc and ps[0].doc.startswith("def parse_header(line):")
    assert "return name.strip()" in ps[0].doc
    assert held_out("a.py", 0.0) is False and held_out("a.py", 1.0) is True


def test_training_raises_held_out_recall_on_a_toy_corpus(tmp_path):
    # vocab of 40 terms; a query uses terms 0-19, its code the "translated" terms 20-39: nothing shared, so an
    # untrained (random) matrix cannot match them and training must learn q-term i <-> d-term 20 + i
    g = torch.Generator().manual_seed(0)

    def pair(i):
        ts = [(i + j) % 20 for j in range(3)]
        return {t: 1.0 for t in ts}, {20 + t: 1.0 for t in ts}

    rows = [pair(i) for i in range(20)]
    tq, td = [r[0] for r in rows] * 20, [r[1] for r in rows] * 20
    init = torch.randn(40, 16, generator=g) * 0.1
    weight, rep = train(
        init,
        tq,
        td,
        [r[0] for r in rows],
        [r[1] for r in rows],
        EmbedTrainConfig(epochs=6, batch=20, lr=0.05, width=8),
        str(tmp_path),
        in_process=True,
    )
    assert rep["after"]["recall@1"] > rep["before"]["recall@1"] + 0.3 and rep["after"]["recall@5"] >= 0.9
    assert weight.shape == (40, 16) and rep["losses"][-1] < rep["losses"][0]


# ---- a transformer checkpoint as the bi-encoder --------------------------------------------------------------------
CONCEPTS = (
    "header socket buffer record column token window cursor message signal folder archive process thread queue "
    "packet string number matrix vector"
).split()


def planted_sources(root, files: int = 40, per_file: int = 8, seed: int = 0):
    """Python files whose documented functions each read concept ``a`` of a ``b``: the docstring says it in words,
    the code in identifiers. Held-out files hold new (a, b) combinations of the same concepts, so what generalises
    is matching concepts across the two forms (an untrained model ranks the right code near chance)."""
    import random

    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    for f in range(files):
        src = ""
        for j in range(per_file):
            a, b = rng.sample(CONCEPTS, 2)
            src += (
                f"def get_{a}_{b}_{f}_{j}(self, key):\n"
                f'    """Return the {a} kept for the {b} named by key."""\n'
                f"    found = self.{b}s[key]\n    return found.{a}\n\n\n"
            )
        (root / f"m{f}.py").write_text(src)
    return root


def test_mean_pooling_ignores_pads(tiny_checkpoint):
    from models.checkpoint import load_checkpoint
    from models.pooling import pool
    from pipelines.embed.objective import encode_tokens, pad_tokens

    # by hand: real tokens (3, 4) and (1, 0) average to (2, 2) -> (0.7071, 0.7071); the pad (100, -50) is left out
    hidden = torch.tensor([[[3.0, 4.0], [1.0, 0.0], [100.0, -50.0]]])
    v = pool(hidden, torch.tensor([[1.0, 1.0, 0.0]]), "mean")
    assert torch.allclose(v, torch.tensor([[0.5**0.5, 0.5**0.5]]), atol=1e-6)
    # through the model: a row padded with any id embeds as it does alone (causal attention, masked pool)
    model, tok = load_checkpoint(tiny_checkpoint)
    ids = tok.encode("def parse_header(line): return line")
    alone, lens = pad_tokens([ids], len(ids), tok.pad_id)
    padded, plens = pad_tokens([ids, ids[:3]], len(ids) + 7, 5)
    with torch.no_grad():
        a = encode_tokens(model, torch.from_numpy(alone), torch.from_numpy(lens))
        b = encode_tokens(model, torch.from_numpy(padded), torch.from_numpy(plens))
    assert plens.tolist() == [len(ids), 3] and torch.allclose(a[0], b[0], atol=1e-5)
    assert not torch.allclose(b[0], b[1], atol=1e-3)


def test_embed_train_from_a_checkpoint_raises_held_out_recall(tiny_checkpoint, tmp_path):
    import json

    import numpy as np

    from cluster.cli import main
    from pipelines.embed.pairs import corpus_pairs
    from serve.vectors import load_embedder

    data, out = planted_sources(tmp_path / "src"), tmp_path / "emb"
    args = ["embed-train", "--init-from", f"ckpt:{tiny_checkpoint}", "--data", str(data), "--out", str(out)]
    args += ["--held-out", "0.25", "--steps", "40", "--batch", "32", "--lr", "1e-3", "--max-tokens", "64"]
    assert main([*args, "--in-process"]) == 0
    rep = json.loads((out / "train_report.json").read_text())
    before, after = rep["before"], rep["after"]
    assert rep["held_out_pairs"] >= 30 and rep["steps"] == 40 and rep["cut_documents"] == 0
    assert after["recall@1"] > before["recall@1"] + 0.4 and after["recall@5"] >= 0.8, rep
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stage"] == "embed-train" and manifest["status"] == "finished"
    assert manifest["metrics"]["heldout_recall@1"] == after["recall@1"]
    assert (out / "model" / "tokenizer.tiktoken").exists() and (out / "metrics.jsonl").exists()
    assert json.loads((out / "model" / "embedder.json").read_text())["max_tokens"] == 64  # served with it
    # the folder is a ckpt: embedder as is, and it retrieves as the report says (no text was cut)
    emb = load_embedder(f"ckpt:{out}")
    _, te = corpus_pairs([(p, p.name) for p in sorted(data.glob("*.py"))], 0.25)
    q, d = emb.embed([p.query for p in te]), emb.embed([p.doc for p in te])
    assert emb.dim == 64 and np.allclose(np.linalg.norm(q, axis=1), 1.0, atol=1e-5)
    assert recall_at(torch.from_numpy(q), torch.from_numpy(d)) == pytest.approx(after, abs=0.05)
    assert emb.identity != load_embedder(f"ckpt:{tiny_checkpoint}").identity
    assert main([*args, "--in-process"]) != 0  # a finished artifact is kept unless --overwrite


def test_embed_train_keeps_an_imported_models_tokenizer(hf_checkpoint, tmp_path):
    from cluster.cli import main
    from serve.vectors import load_embedder

    data, out = planted_sources(tmp_path / "src", files=12), tmp_path / "emb"
    args = ["embed-train", "--init-from", str(hf_checkpoint), "--data", str(data), "--out", str(out)]
    assert main([*args, "--held-out", "0.3", "--steps", "2", "--batch", "8", "--in-process"]) == 0
    assert (out / "model" / "tokenizer.json").read_text() == (hf_checkpoint / "tokenizer.json").read_text()
    assert not (out / "model" / "tokenizer.tiktoken").exists()
    assert load_embedder(str(out / "model")).embed(["a query"]).shape == (1, 64)

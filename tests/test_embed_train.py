"""embed-train's parts: the InfoNCE loss against a hand computation, held-out recall, docstring -> code pairs, and a
few steps of the shared training loop (in process, no Ray) raising held-out recall on a toy corpus."""

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

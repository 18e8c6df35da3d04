"""Dedup as plain functions (no Ray): MinHash accuracy, LSH recall/precision on planted pairs at known Jaccard,
bounded big buckets, connected components with a deterministic survivor. Also the planted-corpus helpers that
tests/test_data.py feeds through the Ray pipeline."""

from __future__ import annotations

import hashlib
from collections import defaultdict

import numpy as np
import pytest

from pipelines.data.dedup import (
    MinHashConfig,
    band_keys,
    bucket_edges,
    content_hash,
    permutations,
    shingle_hashes,
    signature,
    splitmix64,
    survivors,
    text_signature,
    word_hashes,
)
from tests.helpers import edit, jaccard, prose_words, render, vocabulary

# ---- planted corpus ---------------------------------------------------------------------------------------------


def planted_pairs(n_high: int, n_low: int, n_words: int = 300, seed: int = 0):
    """(docs as word lists, [(i, j, true Jaccard)]): ``n_high`` pairs at J in [0.8, 0.92], ``n_low`` at J <= 0.5."""
    rng = np.random.default_rng(seed)
    vocab = vocabulary(seed=seed)
    docs: list[list[str]] = []
    pairs: list[tuple[int, int, float]] = []
    shingles = n_words - 4
    for t in range(n_high + n_low):
        base = prose_words(rng, vocab, n_words)
        # k edits remove 5k shingles and add 5k: J = (S - 5k) / (S + 5k)
        target = rng.uniform(0.8, 0.92) if t < n_high else rng.uniform(0.3, 0.5)
        k = max(1, int(round(shingles * (1 - target) / (5 * (1 + target)))))
        if t >= n_high:
            k = max(k, int(np.ceil(shingles * 0.5 / (5 * 1.5))) + 1)
        var = edit(base, k, rng, vocab)
        docs += [base, var]
        pairs.append((2 * t, 2 * t + 1, jaccard(base, var)))
    return docs, pairs


# ---- MinHash ------------------------------------------------------------------------------------------------------


def test_word_hashes_are_case_insensitive_and_distinct():
    h = word_hashes("Alpha beta ALPHA gamma_1 ünï")
    assert h.shape == (5,)
    assert h[0] == h[2]
    assert len(set(h.tolist())) == 4
    assert word_hashes("...  ,,").size == 0


def test_shingles_count_and_short_text():
    assert shingle_hashes("a b c d e f g", 5).size == 3  # 7 words -> 3 distinct 5-grams
    assert shingle_hashes("a b c", 5).size == 1  # shorter than n: one shingle
    assert shingle_hashes("", 5).size == 0


def test_signature_estimates_jaccard_with_minhash_variance():
    rng = np.random.default_rng(0)
    a, b = permutations(112, 1)
    errs = []
    for _ in range(200):
        base = splitmix64(rng.integers(0, 2**63, size=800, dtype=np.uint64))
        other = np.concatenate([base[:600], splitmix64(rng.integers(0, 2**63, size=200, dtype=np.uint64))])
        j = 600 / 1000
        errs.append(np.mean(signature(base, a, b) == signature(other, a, b)) - j)
    sd = np.sqrt(j * (1 - j) / 112)
    assert abs(np.mean(errs)) < 0.015  # unbiased
    assert np.std(errs) < 1.3 * sd  # as good as ideal MinHash


def test_content_hash_is_stable():
    # hand-computed once: blake2b-64 of b"hello\n", little-endian signed
    want = int.from_bytes(hashlib.blake2b(b"hello\n", digest_size=8).digest(), "little", signed=True)
    assert content_hash("hello\n") == want
    assert content_hash("hello\n") != content_hash("hello \n")


def lsh_losers(texts: list[str], cfg: MinHashConfig) -> set[str]:
    """The whole near-dup step without Ray: signatures -> band buckets -> confirmed edges -> components."""
    perms = permutations(cfg.num_perm, cfg.seed)
    ids = [f"d{i:05d}" for i in range(len(texts))]
    sigs = [text_signature(t, cfg, perms) for t in texts]
    buckets: dict[int, list[int]] = defaultdict(list)
    for i, s in enumerate(sigs):
        for band in band_keys(s, cfg.bands, cfg.rows).tolist():
            buckets[band].append(i)
    edges = []
    for members in buckets.values():
        edges += bucket_edges(
            [ids[i] for i in members], np.stack([sigs[i] for i in members]), cfg.threshold, cfg.max_bucket_pairs
        )
    return set(survivors(edges))


def test_planted_pairs_recall_and_precision():
    docs, pairs = planted_pairs(n_high=150, n_low=150)
    losers = lsh_losers([render(d) for d in docs], MinHashConfig())
    high = [(i, j) for i, j, jac in pairs if jac >= 0.8]
    low = [(i, j) for i, j, jac in pairs if jac <= 0.5]
    assert len(high) >= 120 and len(low) >= 140
    recall = np.mean([f"d{j:05d}" in losers or f"d{i:05d}" in losers for i, j in high])
    false_merge = np.mean([f"d{j:05d}" in losers or f"d{i:05d}" in losers for i, j in low])
    assert recall >= 0.9, recall
    assert false_merge <= 0.01, false_merge
    # the survivor of a merged pair is its smaller id; only pair members were ever merged
    assert all(f"d{i:05d}" not in losers for i, _ in high)
    assert losers <= {f"d{j:05d}" for _, j, _ in pairs}


def test_huge_bucket_is_bounded_and_still_one_cluster():
    n, max_pairs = 3000, 8
    sig = np.arange(112, dtype=np.uint32)
    ids = [f"k{i:06d}" for i in range(n)][::-1]  # unsorted input
    edges = bucket_edges(ids, np.tile(sig, (n, 1)), threshold=0.7, max_pairs=max_pairs)
    assert len(edges) <= n * max_pairs  # not n^2 / 2 = 4.5M
    losers = set(survivors(edges))
    assert len(losers) == n - 1 and "k000000" not in losers  # one component, smallest id survives


def test_bucket_edges_confirm_by_signature_agreement():
    a = np.arange(112, dtype=np.uint32)
    b = a.copy()
    b[:40] += 1000  # agrees on 72/112 = 0.64 < 0.7
    c = a.copy()
    c[:20] += 1000  # agrees on 92/112 = 0.82
    assert bucket_edges(["x", "y"], np.stack([a, b]), 0.7, 8) == []
    assert bucket_edges(["y", "x"], np.stack([c, a]), 0.7, 8) == [("x", "y")]


def test_band_keys_need_enough_permutations():
    with pytest.raises(ValueError, match="num_perm"):
        band_keys(np.zeros(50, dtype=np.uint32), 14, 8)

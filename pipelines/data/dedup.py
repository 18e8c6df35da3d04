"""Deduplication as plain numpy functions (no Ray): exact content hash, vectorised MinHash, LSH banding, clustering.

MinHash here never loops over shingles in Python:

1. words: the document's UTF-8 bytes as a uint8 array; a word is a maximal run of letters/digits/underscore or any
   non-ASCII byte (so words of every script count), lowercased first;
2. word hashes: a polynomial hash of every word's bytes computed for all words at once from prefix sums mod 2**64
   (``B`` odd, so it has an inverse mod 2**64), then a splitmix64 finaliser;
3. shingle hashes: word ``k``-grams combined as ``mix(sum_j h[t + j] * C_j)`` (mod 2**64) with odd constants;
4. signature: ``(a_i * x + b_i) mod 2**32`` over the top 32 bits x of each shingle hash, for ``num_perm`` (a_i odd,
   b_i) pairs, minimised over the shingles: one (shingles x perms) uint32 matrix per chunk.

LSH: the signature is cut into ``bands`` x ``rows``; each band's rows hash into a 64-bit bucket key (band index
mixed in). Documents sharing a bucket are candidates; a candidate pair is confirmed only when the signatures agree on
at least ``threshold`` of the permutations (the MinHash estimate of Jaccard), which keeps dissimilar pairs that
collide in one band out. Big buckets (boilerplate) never expand to O(n^2) pairs: members are sorted by id and each
is checked only against the bucket's ``max_bucket_pairs`` preceding members, chaining the rest (connected components
stay correct for chains of similar documents).

The data stage's dedup steps over Arrow batches (``select_kept`` -> ``group_rows`` -> groupby(kind, gkey) ->
``group_edges``) are plain functions at the end of this module; the stage wraps them in Ray Data.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

M64 = np.uint64(0xFFFFFFFFFFFFFFFF)
_B = np.uint64(0x100000001B3)  # FNV prime: odd, so invertible mod 2**64
_B_INV = np.uint64(pow(0x100000001B3, -1, 2**64))
_SHINGLE_C = np.array(
    [
        0x9E3779B97F4A7C15,
        0xC2B2AE3D27D4EB4F,
        0x165667B19E3779F9,
        0xD6E8FEB86659FD93,
        0xFF51AFD7ED558CCD,
        0xC4CEB9FE1A85EC53,
        0x27D4EB2F165667C5,
        0x85EBCA77C2B2AE63,
        0x94D049BB133111EB,
        0xBF58476D1CE4E5B9,
    ],
    dtype=np.uint64,
)
_MAX_CHUNK = 1 << 15  # shingles per (chunk x perms) matrix: 32k x 112 x 4 B = 14 MB


@dataclass
class MinHashConfig:
    """MinHash LSH near-duplicate detection (defaults: word 5-grams, 112 permutations as 14 bands x 8 rows)."""

    enabled: bool = True
    ngram: int = 5
    num_perm: int = 112
    bands: int = 14
    rows: int = 8
    threshold: float = 0.7  # estimated Jaccard a candidate pair needs to be merged
    max_bucket_pairs: int = 32  # a bucket member is compared with at most this many earlier members
    seed: int = 1


def content_hash(text: str) -> int:
    """64-bit hash of the (normalised) text, as a signed int64-compatible Python int (stable across processes)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little", signed=True)


def splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser, elementwise over a uint64 array (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        x = x.astype(np.uint64, copy=True)
        x ^= x >> np.uint64(30)
        x *= np.uint64(0xBF58476D1CE4E5B9)
        x ^= x >> np.uint64(27)
        x *= np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    return x


_WORD_BYTE = np.zeros(256, dtype=bool)
for _c in b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_":
    _WORD_BYTE[_c] = True
_WORD_BYTE[128:] = True


_POW_CACHE: list[np.ndarray] = [np.zeros(0, dtype=np.uint64), np.zeros(0, dtype=np.uint64)]


def _power_tables(n: int) -> tuple[np.ndarray, np.ndarray]:
    """(Binv^k, B^k) for k < n, grown on demand (doubling) and reused across documents."""
    if _POW_CACHE[0].size < n:
        size = max(n, 2 * _POW_CACHE[0].size, 1 << 16)
        with np.errstate(over="ignore"):
            inv = np.cumprod(np.full(size, _B_INV, dtype=np.uint64), dtype=np.uint64)
            fwd = np.cumprod(np.full(size, _B, dtype=np.uint64), dtype=np.uint64)
        one = np.ones(1, dtype=np.uint64)
        _POW_CACHE[0] = np.concatenate((one, inv[:-1]))
        _POW_CACHE[1] = np.concatenate((one, fwd[:-1]))
    return _POW_CACHE[0], _POW_CACHE[1]


def word_hashes(text: str) -> np.ndarray:
    """uint64 hash of every word of ``text`` (lowercased), in order; shape (n_words,)."""
    b = np.frombuffer(text.lower().encode("utf-8", errors="replace"), dtype=np.uint8)
    if b.size == 0:
        return np.zeros(0, dtype=np.uint64)
    is_word = _WORD_BYTE[b]
    edges = np.diff(is_word.astype(np.int8), prepend=np.int8(0), append=np.int8(0))
    starts = np.flatnonzero(edges == 1)
    ends = np.flatnonzero(edges == -1)  # exclusive
    if starts.size == 0:
        return np.zeros(0, dtype=np.uint64)
    inv_pow, pow_b = _power_tables(b.size)
    with np.errstate(over="ignore"):
        # S[k] = sum_{i<k} (c_i + 1) * Binv^i ; hash(a, e) = B^(e-1) * (S[e] - S[a]) = sum_i (c_i + 1) B^(e-1-i)
        terms = b.astype(np.uint64)
        terms += np.uint64(1)
        terms *= inv_pow[: b.size]
        pref = np.empty(b.size + 1, dtype=np.uint64)
        pref[0] = 0
        np.cumsum(terms, dtype=np.uint64, out=pref[1:])
        h = pow_b[ends - 1] * (pref[ends] - pref[starts])
        h += (ends - starts).astype(np.uint64)  # length tag
    return splitmix64(h)


def shingle_hashes(text: str, ngram: int) -> np.ndarray:
    """uint64 hash of every word ``ngram``-gram (a text shorter than ``ngram`` words is one shingle); unique."""
    h = word_hashes(text)
    if h.size == 0:
        return h
    k = min(ngram, h.size)
    if ngram > len(_SHINGLE_C):
        raise ValueError(f"minhash.ngram={ngram} is too large; use at most {len(_SHINGLE_C)}")
    m = h.size - k + 1
    with np.errstate(over="ignore"):
        acc = h[:m] * _SHINGLE_C[0]
        for j in range(1, k):
            acc += h[j : j + m] * _SHINGLE_C[j]
    return np.unique(splitmix64(acc))


def permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(a, b): ``num_perm`` hash parameters as uint32, a odd; deterministic from ``seed``."""
    rng = np.random.Generator(np.random.PCG64(seed))
    a = rng.integers(0, 2**32 - 1, size=num_perm, dtype=np.uint32, endpoint=True) | np.uint32(1)
    b = rng.integers(0, 2**32 - 1, size=num_perm, dtype=np.uint32, endpoint=True)
    return a, b


def signature(shingles: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """MinHash signature, shape (num_perm,) uint32: min over shingles x of ``(a * x + b) mod 2**32``.

    x is the top 32 bits of the (already splitmix-mixed) 64-bit shingle hash, so x is uniform and each
    ``x -> a * x + b`` (a odd) is a bijection of the 32-bit values: uint32 arithmetic throughout, half the memory
    traffic of 64-bit multiply-shift, with the same Jaccard-estimate variance (checked in tests/test_data_dedup.py).
    """
    x = (np.asarray(shingles, dtype=np.uint64) >> np.uint64(32)).astype(np.uint32)
    sig = np.full(a.size, np.iinfo(np.uint32).max, dtype=np.uint32)
    with np.errstate(over="ignore"):
        for lo in range(0, x.size, _MAX_CHUNK):
            v = x[lo : lo + _MAX_CHUNK, None] * a[None, :]  # (chunk, num_perm) uint32, wrapping
            v += b[None, :]
            np.minimum(sig, v.min(axis=0), out=sig)
    return sig


def text_signature(text: str, cfg: MinHashConfig, perms: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    a, b = perms if perms is not None else permutations(cfg.num_perm, cfg.seed)
    return signature(shingle_hashes(text, cfg.ngram), a, b)


def band_keys(sig: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """One uint64 bucket key per band, shape (bands,); the band index is mixed in so bands never collide."""
    if sig.size < bands * rows:
        raise ValueError(f"minhash: num_perm={sig.size} < bands*rows={bands * rows}; make num_perm >= bands*rows")
    s = sig[: bands * rows].astype(np.uint64).reshape(bands, rows)
    with np.errstate(over="ignore"):
        acc = np.arange(1, bands + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        for j in range(rows):
            acc = splitmix64(acc ^ (s[:, j] + _SHINGLE_C[j % len(_SHINGLE_C)]))
    return acc


def bucket_edges(ids: Sequence[str], sigs: np.ndarray, threshold: float, max_pairs: int) -> list[tuple[str, str]]:
    """Confirmed (smaller id, larger id) pairs among one bucket's members; ``sigs`` shape (n, num_perm).

    Members are sorted by id; member i is compared with members max(0, i - max_pairs) .. i - 1 only, so a bucket of
    n members costs O(n * max_pairs), never O(n^2).
    """
    order = sorted(range(len(ids)), key=lambda i: ids[i])
    out: list[tuple[str, str]] = []
    if len(order) < 2:
        return out
    s = np.asarray(sigs)[order]
    sorted_ids = [ids[i] for i in order]
    for i in range(1, len(order)):
        lo = max(0, i - max_pairs)
        sim = (s[lo:i] == s[i][None, :]).mean(axis=1)  # (i - lo,)
        for j in np.flatnonzero(sim >= threshold):
            out.append((sorted_ids[lo + int(j)], sorted_ids[i]))
    return out


class UnionFind:
    """Connected components over string ids; each component's representative is its smallest id."""

    def __init__(self) -> None:
        self.parent: dict[str, str] = {}

    def find(self, x: str) -> str:
        p = self.parent.setdefault(x, x)
        root = x
        while p != root:
            root = p
            p = self.parent.setdefault(root, root)
        while self.parent[x] != root:  # path compression
            self.parent[x], x = root, self.parent[x]
        return root

    def union(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            lo, hi = (ra, rb) if ra < rb else (rb, ra)
            self.parent[hi] = lo


def survivors(edges: Iterable[tuple[str, str]]) -> dict[str, str]:
    """{id to drop: its component's survivor} — every member of a connected component except its smallest id."""
    uf = UnionFind()
    for a, b in edges:
        uf.union(a, b)
    return {x: r for x in uf.parent if (r := uf.find(x)) != x}


# ---- the data stage's dedup steps over Arrow batches (Ray Data UDFs) -----------------------------------------------

EXACT_KIND, BAND_KIND = 0, 1


def select_kept(batch: pa.Table, columns: list[str], kept: str = "kept") -> pa.Table:
    """The rows whose ``status`` is ``kept``, only ``columns``."""
    return batch.filter(pc.equal(batch.column("status"), kept)).select(columns)


def group_rows(batch: pa.Table, mh: MinHashConfig, exact: bool) -> pa.Table:
    """Kept documents (``key``, ``hash``, ``sig``) -> dedup group rows ``(kind, gkey, key, sig)``: one exact row keyed
    by the content hash (``kind`` 0) and, with MinHash on, one row per LSH band keyed by the band's bucket (``kind`` 1)."""
    kinds, gkeys, keys, sigs = [], [], [], []
    no_sig = np.zeros(0, dtype=np.uint32)
    for key, h, sig in zip(
        batch.column("key").to_pylist(),
        batch.column("hash").to_pylist(),
        batch.column("sig").to_numpy(zero_copy_only=False),
    ):
        if exact:
            kinds.append(EXACT_KIND)
            gkeys.append(h)
            keys.append(key)
            sigs.append(no_sig)
        if mh.enabled:
            sig = np.asarray(sig, dtype=np.uint32)
            bk = band_keys(sig, mh.bands, mh.rows).view(np.int64)  # (bands,) bucket keys as int64 bit patterns
            kinds += [BAND_KIND] * bk.size
            gkeys += bk.tolist()
            keys += [key] * bk.size
            sigs += [sig] * bk.size
    return pa.table(
        {
            "kind": pa.array(kinds, type=pa.int8()),
            "gkey": pa.array(gkeys, type=pa.int64()),
            "key": pa.array(keys, type=pa.string()),
            "sig": pa.array([x.tolist() for x in sigs], type=pa.list_(pa.uint32())),
        }
    )


def group_edges(group: pa.Table, mh: MinHashConfig) -> pa.Table:
    """One dedup group -> edges ``(kind, a, b)``, a < b.

    An exact group (same content hash) links every member to its smallest key: n - 1 edges whose ``b`` are the
    exact duplicates. A band bucket yields confirmed near-duplicate edges, at most ``max_bucket_pairs`` per member.
    """
    keys = group.column("key").to_pylist()
    edges: list[tuple[str, str]] = []
    kind = int(group.column("kind")[0].as_py()) if group.num_rows else BAND_KIND
    if kind == EXACT_KIND:
        ks = sorted(set(keys))
        edges = [(ks[0], k) for k in ks[1:]]
    elif len(keys) > 1:
        sigs = np.array(group.column("sig").to_pylist(), dtype=np.uint32)
        edges = bucket_edges(keys, sigs, mh.threshold, mh.max_bucket_pairs)
    return pa.table(
        {
            "kind": pa.array([kind] * len(edges), type=pa.int8()),
            "a": pa.array([e[0] for e in edges], type=pa.string()),
            "b": pa.array([e[1] for e in edges], type=pa.string()),
        }
    )

"""Dense retrieval beside the knowledge store: embedders (text -> unit vectors) and the vector index that follows the
SQLite store (``serve.knowledge``), which stays the source of truth.

Index: faiss-cpu ``IndexIDMap2(IndexFlatIP)``: exact inner-product search over unit vectors (cosine), keyed by the
store's chunk ids, with add and remove by id. Chosen by measurement (``bench/vector_bench.py``, this machine, 384
dims, one thread): 10k chunks p50 0.56 ms per query, 100k chunks 12.9 ms, recall 1.0, build 0.35 s, 100 removals
20 ms; exact numpy 7.9 / 17.4 ms; hnswlib and usearch (HNSW) query under 1.3 ms but take 47 s / 206 s to build 100k
on one thread and, at default parameters, find 0.36 / 0.46 of the true top 10 on clustered vectors; sqlite-vec
cannot load here (this Python's ``sqlite3`` has no ``enable_load_extension``).

Files beside ``knowledge.db``: ``knowledge.vectors.faiss`` (the index) and ``knowledge.vectors.json`` (the
embedder's identity, dimension, count). Both are a cache: missing, unreadable, of another embedder or dimension,
they are rebuilt from the chunks in SQLite (``serve.knowledge.KnowledgeStore`` does that, logged).

Embedders (``load_embedder(spec)``; ``identity`` names the embedder and a digest of what it computes with, and is
recorded in the store, so vectors of one embedder are never searched with another's query vectors):

- ``hash:DIM``: signed feature hashing of the code-aware terms (``serve.terms``); no training, a lexical baseline and
  what the tests use;
- ``lsa:DIR``: latent semantic analysis fitted on a store's chunks (``genloop knowledge embedder``): TF-IDF of the
  code-aware terms projected on the top singular vectors; learns which terms occur together in the corpus;
- ``ckpt:DIR`` (or a checkpoint folder): a genloop checkpoint's mean-pooled final hidden states
  (``serve.embeddings``); inputs over its context are cut to the context (logged). ``DIR`` may be an artifact with
  the checkpoint in ``model/``: ``genloop embed-train --init-from CKPT`` writes such a bi-encoder, trained for this,
  with ``embedder.json`` beside the weights: inputs are cut at its ``max_tokens``, as in training.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections import Counter
from pathlib import Path
from typing import Iterable, Protocol

import numpy as np

from serve.terms import code_terms

log = logging.getLogger(__name__)


class VectorError(ValueError):
    """The vector side cannot be used as configured (another embedder's store, bad spec); the message says what to
    do."""


class Embedder(Protocol):
    identity: str  # e.g. "hash:256", "lsa:<sha256 of its files>[:16]": recorded in the store
    dim: int
    max_chars: int  # the longest text it embeds whole; the store refuses a chunk size above it

    def embed(self, texts: list[str]) -> np.ndarray:
        """(len(texts), dim) float32, rows of unit length (a text with nothing to embed: a zero row)."""
        ...


def _normalise(m: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(m, axis=1, keepdims=True)
    return (m / np.where(n > 0, n, 1.0)).astype(np.float32)


def _hash(term: str) -> int:
    return int.from_bytes(hashlib.blake2b(term.encode(), digest_size=8).digest(), "little")


class HashEmbedder:
    """Signed feature hashing of ``code_terms`` (log-scaled counts) into ``dim`` buckets."""

    def __init__(self, dim: int = 256) -> None:
        if dim < 8:
            raise VectorError(f"hash embedder: dim must be >= 8, got {dim}")
        self.dim, self.identity, self.max_chars = dim, f"hash:{dim}", 1_000_000

    def embed(self, texts: list[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), np.float32)
        for i, t in enumerate(texts):
            for term, c in Counter(code_terms(t)).items():
                h = _hash(term)
                out[i, h % self.dim] += (1.0 if (h >> 63) else -1.0) * (1.0 + math.log(c))
        return _normalise(out)


class LsaEmbedder:
    """TF-IDF over ``code_terms`` (sublinear counts, terms in 2 chunks up to ``max_df`` of them) projected on the
    top ``dim`` right singular vectors of the corpus matrix. Files: ``lsa.json`` (vocabulary, idf) and ``lsa.npy``
    (vocab x dim)."""

    def __init__(self, vocab: dict[str, int], idf: np.ndarray, proj: np.ndarray, identity: str) -> None:
        self.vocab, self.idf, self.proj = vocab, idf.astype(np.float32), proj.astype(np.float32)
        self.dim, self.identity, self.max_chars = int(proj.shape[1]), identity, 1_000_000

    def _tfidf(self, texts: list[str]):
        from scipy.sparse import csr_matrix

        rows, cols, vals = [], [], []
        for i, t in enumerate(texts):
            for term, c in Counter(code_terms(t)).items():
                j = self.vocab.get(term)
                if j is not None:
                    rows.append(i)
                    cols.append(j)
                    vals.append((1.0 + math.log(c)) * self.idf[j])
        m = csr_matrix((vals, (rows, cols)), shape=(len(texts), len(self.vocab)), dtype=np.float32)
        norms = np.sqrt(m.multiply(m).sum(axis=1)).A1
        return csr_matrix(m.multiply(1.0 / np.where(norms > 0, norms, 1.0)[:, None]))

    def embed(self, texts: list[str]) -> np.ndarray:
        return _normalise(np.asarray(self._tfidf(texts) @ self.proj))

    def bags(self, texts: list[str]) -> list[dict[int, float]]:
        """Each text's normalised TF-IDF weights ``{term id: weight}``: ``embed`` is the normalised sum of the
        weighted rows of ``proj`` (what ``pipelines.embed.train`` fine-tunes)."""
        m = self._tfidf(texts)
        return [
            dict(zip(m.indices[m.indptr[i] : m.indptr[i + 1]].tolist(), m.data[m.indptr[i] : m.indptr[i + 1]].tolist()))
            for i in range(m.shape[0])
        ]

    @classmethod
    def fit(
        cls, texts: list[str], dim: int = 256, max_vocab: int = 100_000, max_df: float = 0.05, seed: int = 0
    ) -> "LsaEmbedder":
        """``max_df``: terms in more than this share of the chunks are left out (function words, ``self``,
        ``return``): in a short query they would otherwise pull toward whatever chunk is full of them."""
        from scipy.sparse.linalg import svds

        df: Counter = Counter()
        for t in texts:
            df.update(set(code_terms(t)))
        top = max_df * len(texts)
        terms = sorted((t for t, n in df.items() if 2 <= n <= top), key=lambda t: (-df[t], t))[:max_vocab]
        if len(terms) <= dim or len(texts) <= dim:
            raise VectorError(
                f"LSA with {dim} dimensions needs more than {dim} chunks and terms; the store has "
                f"{len(texts)} chunks and {len(terms)} terms in two or more of them: lower --dim"
            )
        vocab = {t: i for i, t in enumerate(terms)}
        idf = np.array([math.log(len(texts) / df[t]) + 1.0 for t in terms], np.float32)
        tmp = cls(vocab, idf, np.zeros((len(terms), 1), np.float32), "lsa:unfitted")
        m = tmp._tfidf(texts)
        v0 = np.random.default_rng(seed).standard_normal(min(m.shape))
        _, s, vt = svds(m.astype(np.float64), k=dim, v0=v0)
        order = np.argsort(-s)
        return cls(vocab, idf, vt[order].T, "lsa:unsaved")

    def save(self, out: str | Path) -> str:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        terms = sorted(self.vocab, key=self.vocab.__getitem__)
        (out / "lsa.json").write_text(json.dumps({"terms": terms, "idf": self.idf.tolist()}))
        np.save(out / "lsa.npy", self.proj)
        self.identity = lsa_identity(out)
        return self.identity

    @classmethod
    def load(cls, path: str | Path) -> "LsaEmbedder":
        p = Path(path)
        try:
            meta = json.loads((p / "lsa.json").read_text())
            proj = np.load(p / "lsa.npy")
        except (OSError, ValueError) as e:
            raise VectorError(
                f"embedder lsa:{p}: cannot read lsa.json / lsa.npy ({e}); fit one with "
                "`genloop knowledge embedder --store DB --out DIR`"
            ) from None
        if proj.ndim != 2 or proj.shape[0] != len(meta["terms"]):
            raise VectorError(f"embedder lsa:{p}: lsa.npy is {proj.shape}, expected ({len(meta['terms'])}, dim)")
        return cls({t: i for i, t in enumerate(meta["terms"])}, np.array(meta["idf"]), proj, lsa_identity(p))


def lsa_identity(path: Path) -> str:
    h = hashlib.sha256()
    for f in ("lsa.json", "lsa.npy"):
        h.update((path / f).read_bytes())
    return f"lsa:{h.hexdigest()[:16]}"


class CheckpointEmbedder:
    """A genloop checkpoint's final hidden states, pooled (``serve.embeddings``); identity: the weights' digest.
    ``path``: a checkpoint folder, or an artifact holding one in ``model/`` (what ``genloop embed-train`` writes)."""

    def __init__(self, path: str | Path, pooling: str = "mean") -> None:
        from models.checkpoint import load_config, load_tokenizer, resolve_checkpoint
        from serve.embeddings import Embedder as HiddenStates

        p = Path(resolve_checkpoint(path))
        self.tok = load_tokenizer(p)
        self.context = load_config(p).max_seq_len
        self.hidden = HiddenStates.load(str(p))
        self.pooling = pooling
        h = hashlib.sha256()
        for f in sorted(p.glob("*.safetensors")) or sorted(p.glob("*.bin")):
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
        self.identity = f"ckpt-{pooling}:{h.hexdigest()[:16]}"
        # a bi-encoder from `genloop embed-train` was trained on texts cut to its max_tokens: cut there too, so a
        # stored document is embedded as the training documents were (its identity says so)
        self.max_tokens = self.context
        trained = _trained_max_tokens(p)
        if trained:
            self.max_tokens = min(trained, self.context)
            self.identity = f"ckpt-{pooling}-{self.max_tokens}t:{h.hexdigest()[:16]}"
        self.dim = len(self.hidden.embed([[0]], pooling)[0])
        self.max_chars = self.context  # at least one token per character of ASCII text with a byte-level BPE

    def embed(self, texts: list[str]) -> np.ndarray:
        encoded = [self.tok.encode(t) for t in texts]
        ids = [e[: self.max_tokens] or [0] for e in encoded]
        cut = sum(len(e) > self.context for e in encoded)  # over the context: lost to any use of this model
        if cut:
            log.warning(
                "checkpoint embedder: %d of %d inputs were over the context of %d tokens and were cut to it",
                cut,
                len(texts),
                self.context,
            )
        return np.asarray(self.hidden.embed(ids, self.pooling), np.float32)


def _trained_max_tokens(model_dir: Path) -> int:
    """``max_tokens`` from ``embedder.json`` beside a bi-encoder's weights (``genloop embed-train``); 0 without one."""
    f = model_dir / "embedder.json"
    if not f.is_file():
        return 0
    try:
        value = int(json.loads(f.read_text()).get("max_tokens", 0))
    except (ValueError, TypeError, AttributeError) as e:
        raise VectorError(
            f"{f}: not an embedder settings file ({e}); re-run genloop embed-train or delete it"
        ) from None
    if value < 1:
        raise VectorError(f"{f}: max_tokens must be >= 1, got {value}; re-run genloop embed-train or delete it")
    return value


def check_embedder_spec(spec: str) -> None:
    """Fail early (before any replica starts) on a spec ``load_embedder`` would refuse: bad form, missing folder."""
    spec = (spec or "").strip()
    kind, _, arg = spec.partition(":")
    if not spec or kind == "hash":
        load_embedder(spec)
    elif kind in ("lsa", "ckpt"):
        if not Path(arg).is_dir():
            raise VectorError(f"embedder {spec!r}: {arg} is not a folder")
    elif not (Path(spec) / "config.json").exists():
        load_embedder(spec)  # raises, saying what the forms are


def load_embedder(spec: str) -> Embedder | None:
    """``""`` -> None (lexical only); ``hash:DIM``; ``lsa:DIR``; ``ckpt:DIR`` or a checkpoint folder."""
    spec = (spec or "").strip()
    if not spec:
        return None
    kind, _, arg = spec.partition(":")
    if kind == "hash":
        try:
            return HashEmbedder(int(arg or 256))
        except ValueError:
            raise VectorError(f"embedder {spec!r}: write hash:DIM, e.g. hash:256") from None
    if kind == "lsa":
        return LsaEmbedder.load(arg)
    if kind == "ckpt":
        return CheckpointEmbedder(arg)
    if Path(spec).is_dir() and (Path(spec) / "config.json").exists():
        return CheckpointEmbedder(spec)
    raise VectorError(
        f"embedder {spec!r}: use hash:DIM, lsa:DIR (genloop knowledge embedder) or ckpt:DIR "
        "(a genloop checkpoint); empty for lexical retrieval alone"
    )


FAISS_THREADS = 1  # one query is one small matmul: OpenMP threads only add barriers (9.4 -> 2.3 ms at 27k x 256)


class VectorIndex:
    """Exact cosine search over unit vectors keyed by int64 chunk ids (faiss ``IndexIDMap2(IndexFlatIP)``)."""

    def __init__(self, dim: int, identity: str) -> None:
        import faiss

        faiss.omp_set_num_threads(FAISS_THREADS)  # process-wide; concurrent requests are the parallelism
        self.dim, self.identity = dim, identity
        self.index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
        self.ids: set[int] = set()

    def __len__(self) -> int:
        return len(self.ids)

    def add(self, ids: Iterable[int], vectors: np.ndarray) -> None:
        ids = np.asarray(list(ids), np.int64)
        if len(ids) == 0:
            return
        vectors = np.ascontiguousarray(vectors, np.float32)
        if vectors.shape != (len(ids), self.dim):
            raise VectorError(
                f"vectors of shape {vectors.shape} for an index of {len(ids)} x {self.dim}: the "
                f"embedder's dimension does not match the index"
            )
        again = [int(i) for i in ids if int(i) in self.ids]
        if again:
            self.remove(again)
        self.index.add_with_ids(vectors, ids)
        self.ids.update(int(i) for i in ids)

    def remove(self, ids: Iterable[int]) -> int:
        ids = [int(i) for i in ids if int(i) in self.ids]
        if ids:
            self.index.remove_ids(np.asarray(ids, np.int64))
            self.ids.difference_update(ids)
        return len(ids)

    def search(self, query: np.ndarray, k: int) -> list[tuple[int, float]]:
        if not self.ids or k <= 0:
            return []
        q = np.ascontiguousarray(query, np.float32).reshape(1, -1)
        if q.shape[1] != self.dim:
            raise VectorError(f"a query vector of {q.shape[1]} dimensions for an index of {self.dim}")
        scores, ids = self.index.search(q, min(k, len(self.ids)))
        return [(int(i), float(s)) for i, s in zip(ids[0], scores[0]) if i != -1]

    # ---- the files beside the store ------------------------------------------------------------------------------

    def save(self, base: Path) -> None:
        """``base`` + ``.faiss`` / ``.json``, each written to a temporary name and renamed (a reader never sees
        half a file)."""
        import faiss

        idx, meta = base.with_name(base.name + ".faiss"), base.with_name(base.name + ".json")
        tmp = idx.with_name(idx.name + f".tmp{os.getpid()}")
        faiss.write_index(self.index, str(tmp))
        os.replace(tmp, idx)
        tmp = meta.with_name(meta.name + f".tmp{os.getpid()}")
        tmp.write_text(json.dumps({"identity": self.identity, "dim": self.dim, "count": len(self.ids)}))
        os.replace(tmp, meta)

    @classmethod
    def load(cls, base: Path, dim: int, identity: str) -> "VectorIndex | None":
        """The saved index, or None (logged why) when missing, unreadable, or of another embedder or dimension."""
        import faiss

        idx, meta = base.with_name(base.name + ".faiss"), base.with_name(base.name + ".json")
        if not idx.exists() or not meta.exists():
            log.info("vector index %s: missing, building it from the store", idx)
            return None
        try:
            m = json.loads(meta.read_text())
            index = faiss.read_index(str(idx))
            ids = faiss.vector_to_array(index.id_map) if hasattr(index, "id_map") else None
        except (OSError, ValueError, RuntimeError) as e:  # faiss raises RuntimeError on a corrupt file
            log.warning("vector index %s: unreadable (%s), rebuilding it from the store", idx, e)
            return None
        if (
            m.get("identity") != identity
            or m.get("dim") != dim
            or index.d != dim
            or ids is None
            or len(ids) != m.get("count")
        ):
            log.warning(
                "vector index %s: written for %s (%s dims, %s vectors), configured %s (%d dims); rebuilding "
                "it from the store",
                idx,
                m.get("identity"),
                m.get("dim"),
                m.get("count"),
                identity,
                dim,
            )
            return None
        out = cls(dim, identity)
        out.index = index
        out.ids = set(int(i) for i in ids)
        return out

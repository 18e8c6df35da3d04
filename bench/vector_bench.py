"""Vector index candidates for the knowledge store, measured on this machine: build, replace (delete + add), delete,
top-k query latency and recall@10 against exact search, at store sizes of 10k and 100k chunks.

    python bench/vector_bench.py [--sizes 10000,100000] [--dim 384] [--queries 200] [--threads 1]

Candidates: exact numpy (a float32 matrix, one matmul per query), sqlite-vec (a ``vec0`` table inside the SQLite
store: brute force, transactional with the FTS5 table), faiss-cpu (IndexIDMap2 over IndexFlatIP, exact; and HNSW,
which cannot delete), hnswlib (HNSW with mark_deleted) and usearch (HNSW with remove). Vectors are random unit
vectors plus clusters (so ANN recall is not trivially 1). Every library runs on ``--threads`` threads.

Measured (AMD EPYC, 2 shared cores, 1 thread, 384 dims, 100 queries; replace = 100 vectors removed and re-added):

    size  index                  build s  repl100 ms  del100 ms  p50 ms  p99 ms  recall@10
    10k   numpy exact               0.03         8.1        7.8    7.94   12.02      1.000
    10k   faiss IDMap2(FlatIP)      0.01        10.2        1.7    0.56    9.27      1.000
    10k   hnswlib (M=16, ef=64)     1.98       149.3        0.1    0.16    0.27      0.869
    10k   usearch (default)         2.67        32.9        0.1    0.39    0.64      0.884
    100k  numpy exact               1.88        81.5       44.7   17.41   28.25      1.000
    100k  faiss IDMap2(FlatIP)      0.35        20.9       20.2   12.94   15.45      1.000
    100k  hnswlib (M=16, ef=64)    47.04       202.0        0.1    0.48    0.74      0.358
    100k  usearch (default)       205.89      1489.3        0.2    1.26    8.76      0.462
    sqlite-vec: cannot load (this Python's sqlite3 has no enable_load_extension)

The knowledge store uses faiss IndexIDMap2(IndexFlatIP) (serve/vectors.py): exact, the fastest exact search, cheap
add/remove by id, and at 100k chunks a query still costs ~13 ms, about what the rest of a RAG request costs; HNSW
would pay off only well past 100k chunks, and then needs tuned ef/M to be accurate.
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import tempfile
import time
from typing import Callable

import numpy as np


def data(n: int, dim: int, nq: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((max(1, n // 50), dim)).astype(np.float32)
    x = centers[rng.integers(0, len(centers), n)] + 0.5 * rng.standard_normal((n, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    q = x[rng.integers(0, n, nq)] + 0.3 * rng.standard_normal((nq, dim)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    return x, q.astype(np.float32)


class Exact:
    name = "numpy exact"

    def __init__(self, dim: int) -> None:
        self.m = np.zeros((0, dim), np.float32)
        self.ids = np.zeros(0, np.int64)

    def add(self, ids: np.ndarray, x: np.ndarray) -> None:
        self.m = np.concatenate([self.m, x])
        self.ids = np.concatenate([self.ids, ids])

    def delete(self, ids: np.ndarray) -> None:
        keep = ~np.isin(self.ids, ids)
        self.m, self.ids = self.m[keep], self.ids[keep]

    def search(self, q: np.ndarray, k: int) -> np.ndarray:
        s = self.m @ q
        top = np.argpartition(-s, k)[:k]
        return self.ids[top[np.argsort(-s[top])]]


class SqliteVec:
    name = "sqlite-vec (vec0)"

    def __init__(self, dim: int) -> None:
        import sqlite_vec

        self.tmp = tempfile.mkdtemp()
        self.db = sqlite3.connect(os.path.join(self.tmp, "v.db"))
        if not hasattr(self.db, "enable_load_extension"):  # Python built without loadable SQLite extensions
            raise ImportError("this Python's sqlite3 cannot load extensions (no enable_load_extension)")
        self.db.enable_load_extension(True)
        sqlite_vec.load(self.db)
        self.db.execute(f"CREATE VIRTUAL TABLE v USING vec0(embedding float[{dim}] distance_metric=cosine)")

    def add(self, ids: np.ndarray, x: np.ndarray) -> None:
        with self.db:
            self.db.executemany(
                "INSERT INTO v(rowid, embedding) VALUES (?, ?)", [(int(i), r.tobytes()) for i, r in zip(ids, x)]
            )

    def delete(self, ids: np.ndarray) -> None:
        with self.db:
            self.db.executemany("DELETE FROM v WHERE rowid = ?", [(int(i),) for i in ids])

    def search(self, q: np.ndarray, k: int) -> np.ndarray:
        rows = self.db.execute(
            "SELECT rowid FROM v WHERE embedding MATCH ? AND k = ? ORDER BY distance", (q.tobytes(), k)
        ).fetchall()
        return np.array([r[0] for r in rows])


class FaissFlat:
    name = "faiss IDMap2(FlatIP)"

    def __init__(self, dim: int) -> None:
        import faiss

        self.faiss = faiss
        self.ix = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))

    def add(self, ids: np.ndarray, x: np.ndarray) -> None:
        self.ix.add_with_ids(x, ids.astype(np.int64))

    def delete(self, ids: np.ndarray) -> None:
        self.ix.remove_ids(ids.astype(np.int64))

    def search(self, q: np.ndarray, k: int) -> np.ndarray:
        return self.ix.search(q[None], k)[1][0]


class Hnswlib:
    name = "hnswlib HNSW (M=16, ef=64)"

    def __init__(self, dim: int) -> None:
        import hnswlib

        self.ix = hnswlib.Index(space="ip", dim=dim)
        self.ix.init_index(max_elements=1024, ef_construction=100, M=16, allow_replace_deleted=True)
        self.ix.set_ef(64)

    def add(self, ids: np.ndarray, x: np.ndarray) -> None:
        need = self.ix.get_current_count() + len(ids)
        if need > self.ix.get_max_elements():
            self.ix.resize_index(max(need, 2 * self.ix.get_max_elements()))
        self.ix.add_items(x, ids, replace_deleted=True)

    def delete(self, ids: np.ndarray) -> None:
        for i in ids:
            self.ix.mark_deleted(int(i))

    def search(self, q: np.ndarray, k: int) -> np.ndarray:
        return self.ix.knn_query(q[None], k)[0][0]


class Usearch:
    name = "usearch HNSW (default)"

    def __init__(self, dim: int) -> None:
        from usearch.index import Index

        self.ix = Index(ndim=dim, metric="ip", dtype="f32")

    def add(self, ids: np.ndarray, x: np.ndarray) -> None:
        self.ix.add(ids.astype(np.uint64), x)

    def delete(self, ids: np.ndarray) -> None:
        self.ix.remove(ids.astype(np.uint64))

    def search(self, q: np.ndarray, k: int) -> np.ndarray:
        return self.ix.search(q, k).keys


def bench(make: Callable[[int], object], x: np.ndarray, q: np.ndarray, truth: list[set], k: int = 10) -> dict:
    n, dim = x.shape
    ids = np.arange(1, n + 1, dtype=np.int64)
    ix = make(dim)
    t = time.perf_counter()
    for i in range(0, n, 1000):  # batches as a sync writes them
        ix.add(ids[i : i + 1000], x[i : i + 1000])
    build = time.perf_counter() - t
    # replace 100 documents' vectors (delete + add, the ids stay), then delete 100 others
    rep = ids[:100]
    t = time.perf_counter()
    ix.delete(rep)
    ix.add(rep, x[:100])
    replace = time.perf_counter() - t
    gone = ids[100:200]
    t = time.perf_counter()
    ix.delete(gone)
    delete = time.perf_counter() - t
    lat, hit = [], 0
    for qi, tr in zip(q, truth):
        t = time.perf_counter()
        got = ix.search(qi, k)
        lat.append(time.perf_counter() - t)
        got = set(int(g) for g in got)
        if got & set(int(g) for g in gone):
            raise AssertionError(f"{ix.name} returned a deleted id")
        hit += len(got & tr)
    lat_ms = np.array(lat) * 1000
    return {
        "name": ix.name,
        "build_s": build,
        "replace100_ms": replace * 1000,
        "delete100_ms": delete * 1000,
        "p50_ms": float(np.percentile(lat_ms, 50)),
        "p99_ms": float(np.percentile(lat_ms, 99)),
        "recall10": hit / (k * len(q)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10000,100000")
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--only", default="", help="comma-separated candidate class names")
    a = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(a.threads))
    try:
        import faiss

        faiss.omp_set_num_threads(a.threads)
    except ImportError:
        pass
    cands = [Exact, SqliteVec, FaissFlat, Hnswlib, Usearch]
    if a.only:
        cands = [c for c in cands if c.__name__ in a.only.split(",")]
    for n in map(int, a.sizes.split(",")):
        x, q = data(n, a.dim, a.queries)
        s = q @ x.T
        s[:, 100:200] = -np.inf  # deleted rows can never be nearest
        truth = [set((np.argsort(-row)[:10] + 1).tolist()) for row in s]
        print(f"\n{n} vectors x {a.dim} dims, {a.queries} queries, k=10, {a.threads} thread(s)")
        print(
            f"{'index':28s} {'build s':>8s} {'repl100 ms':>10s} {'del100 ms':>9s} {'p50 ms':>7s} {'p99 ms':>7s} "
            f"{'recall@10':>9s}"
        )
        for c in cands:
            try:
                r = bench(c, x, q, truth)
            except ImportError as e:
                print(f"{c.__name__:28s} not installed ({e})")
                continue
            print(
                f"{r['name']:28s} {r['build_s']:8.2f} {r['replace100_ms']:10.1f} {r['delete100_ms']:9.1f} "
                f"{r['p50_ms']:7.2f} {r['p99_ms']:7.2f} {r['recall10']:9.3f}",
                flush=True,
            )


if __name__ == "__main__":
    main()

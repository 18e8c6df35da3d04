"""The training loader: each worker reads only its own rows of each global batch, by random access into the run's
row store (``pipelines/train/row_store.py``), with a bounded read-ahead. Megatron's scheme (a global sample index and
``consumed_samples``), so the order does not depend on the number of workers (MosaicML streaming's promise) and a run
resumes from one number at any worker count (which torchtitan cannot).

Order (pure functions of ``seed`` and the row count, computed by every worker without talking):

* the sample stream is epoch 0's order, then epoch 1's, ...; epoch ``e``'s order is a seeded permutation of the rows
  (``epoch_order``; identity without ``shuffle``). Consecutive blocks of one document land far apart;
* global batch ``g`` is stream places ``[g*B, (g+1)*B)`` (B = global batch rows); a batch may straddle an epoch end,
  so every row is seen once per epoch and nothing is dropped;
* rank ``r`` of ``W`` takes places ``r*B/W + [0, B/W)`` of every global batch, its micro-batches in that order;
* a run that has consumed ``c`` samples continues at place ``c``: the checkpoint stores ``consumed_samples`` and
  nothing else is needed, whatever the worker count before or after.

Memory per worker: the rows of at most ``prefetch + 1`` steps (``B/W`` rows each), the current epoch's permutation
(4 bytes a row) and the rows' loss units (4 bytes a row) — nothing that grows with the bytes of the corpus.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import OrderedDict
from typing import Any, Iterator

import numpy as np

from pipelines.train.row_store import UNITS, RowStore

log = logging.getLogger(__name__)


def epoch_order(n_rows: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    """Epoch ``epoch``'s order of the rows: ``order[p]`` = the row at place ``p`` (int32 below 2^31 rows)."""
    if not shuffle:
        return np.arange(n_rows, dtype=np.int64)
    perm = np.random.default_rng([seed, n_rows, epoch]).permutation(n_rows)
    return perm.astype(np.int32) if n_rows < 2**31 else perm


class SampleOrder:
    """The global sample index: stream place -> row id, epoch after epoch (the last two epochs cached)."""

    def __init__(self, n_rows: int, seed: int, shuffle: bool) -> None:
        if n_rows < 1:
            raise ValueError("the training split has no rows")
        self.n_rows, self.seed, self.shuffle = n_rows, seed, shuffle
        self._epochs: OrderedDict[int, np.ndarray] = OrderedDict()

    def epoch(self, e: int) -> np.ndarray:
        order = self._epochs.get(e)
        if order is None:
            order = self._epochs[e] = epoch_order(self.n_rows, self.seed, e, self.shuffle)
            while len(self._epochs) > 2:
                self._epochs.popitem(last=False)
        return order

    def ids(self, start: int, count: int) -> np.ndarray:
        """Row ids at stream places ``[start, start + count)`` (int64)."""
        parts, place, end = [], start, start + count
        while place < end:
            e, off = divmod(place, self.n_rows)
            take = min(end - place, self.n_rows - off)
            parts.append(self.epoch(e)[off : off + take].astype(np.int64))
            place += take
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def rank_span(global_rows: int, rank: int, world: int) -> slice:
    """The places of rank ``rank`` inside a global batch of ``global_rows``: ``rank*A + [0, A)``, A = rows / world."""
    if global_rows % world:
        raise ValueError(f"a global batch of {global_rows} rows does not split over {world} workers")
    a = global_rows // world
    return slice(rank * a, (rank + 1) * a)


class RankLoader:
    """One rank's rows of every global batch from ``consumed`` samples on (see the module docstring).

    ``dtypes``: column -> numpy dtype the rows are cast to (default int64). ``prefetch``: global batches read ahead
    by a background thread (0 = read on demand). ``bytes_read`` / ``rows_read``: what this rank has read."""

    def __init__(
        self,
        store: RowStore,
        global_rows: int,
        rank: int,
        world: int,
        seed: int,
        shuffle: bool,
        dtypes: dict[str, Any] | None = None,
        prefetch: int = 2,
    ) -> None:
        if UNITS not in store.columns:
            raise ValueError(f"{store.path}: the row store has no {UNITS!r} column; write it with write_rows")
        self.store, self.global_rows = store, global_rows
        self.span = rank_span(global_rows, rank, world)
        self.order = SampleOrder(len(store), seed, shuffle)
        self.dtypes = dtypes or {}
        self.prefetch = max(0, int(prefetch))
        self.units = store.read_column(UNITS).astype(np.float32, copy=False)  # 4 bytes a row

    @property
    def bytes_read(self) -> int:
        return self.store.bytes_read

    @property
    def rows_read(self) -> int:
        return self.store.rows_read

    def epoch_of(self, consumed: int) -> int:
        return consumed // len(self.store)

    def global_ids(self, consumed: int) -> np.ndarray:
        """Row ids of the global batch that starts at ``consumed`` samples (all ranks' rows)."""
        return self.order.ids(consumed, self.global_rows)

    def step(self, consumed: int) -> tuple[dict[str, np.ndarray], float]:
        """(this rank's rows of the global batch at ``consumed``, the whole global batch's loss units)."""
        ids = self.global_ids(consumed)
        rows = self.store.read(ids[self.span])
        rows = {k: v.astype(self.dtypes.get(k, np.int64), copy=False) for k, v in rows.items()}
        return rows, float(self.units[ids].sum(dtype=np.float64))

    def batches(self, consumed: int, steps: int) -> Iterator[tuple[int, dict[str, np.ndarray], float]]:
        """``(consumed before the step, rows, global units)`` for ``steps`` global batches from ``consumed`` on,
        read ``prefetch`` batches ahead by one thread (it stops when the iterator is closed)."""
        B = self.global_rows
        if self.prefetch == 0:
            for i in range(steps):
                yield (consumed + i * B, *self.step(consumed + i * B))
            return
        q: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()

        def put(item: Any) -> bool:
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def produce() -> None:
            try:
                for i in range(steps):
                    c = consumed + i * B
                    if not put((c, *self.step(c))):
                        return
            except BaseException as e:  # handed to the consumer, raised there
                put(e)

        t = threading.Thread(target=produce, name="genloop-loader", daemon=True)
        t.start()
        try:
            for _ in range(steps):
                item = q.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            t.join(timeout=5)


def val_rows(
    store: RowStore | None, wanted: int, rank: int, world: int, dtypes: dict[str, Any] | None = None
) -> dict[str, np.ndarray]:
    """This rank's validation rows: the first ``wanted`` rows of the split (fewer if it is smaller), cut into
    ``world`` equal contiguous parts: the same rows whatever the worker count, the same count on every rank (FSDP
    needs every rank in every forward). {} when there are fewer rows than workers."""
    if store is None or wanted <= 0:
        return {}
    per_rank = min(len(store), wanted) // world
    if per_rank == 0:
        log.warning("validation split has %d rows (< %d workers): no validation loss", len(store), world)
        return {}
    rows = store.read(np.arange(rank * per_rank, (rank + 1) * per_rank))
    return {k: v.astype((dtypes or {}).get(k, np.int64), copy=False) for k, v in rows.items()}

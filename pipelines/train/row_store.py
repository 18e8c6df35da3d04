"""Row stores: the training loop's random-access copy of a split (Megatron's ``.bin`` + ``.idx``, one file per
column).

A store is a folder (local path or ``s3://`` / ``gs://`` URI, through ``pipelines.artifacts.filesystem``)::

    index.json       {"format": "genloop-rows/1", "n_rows": N, "columns": {name: {"dtype": "int32", "shape": [T]}}}
    <column>.bin     N rows of that column, C order, little-endian, no header: row i is at byte i * row_bytes

Every row of a column has the same shape, so row ``i`` is one ranged read at a known offset: a worker reads exactly
the rows it trains on (``RowStore.read``), never a whole shard, and holds nothing between reads. ``index.json`` is
written last: a folder without it is an unfinished store.

The driver writes the store once per run, streaming (``write_rows``: a Ray Dataset in its fixed order, or arrays),
with one extra column ``_units`` (float32: the objective's loss units of each row, so every worker knows every
global batch's divisor without an all-reduce). The Parquet token blocks of the data stage stay the format any Ray
Data user reads; the store is the training run's own derived copy beside its checkpoints.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np

from pipelines.artifacts import filesystem, is_uri, join

log = logging.getLogger(__name__)

FORMAT = "genloop-rows/1"
INDEX = "index.json"
UNITS = "_units"  # per-row loss units (float32), written by write_rows for the loop's global divisor
REMOTE_READERS = 16  # ranged reads in flight at once on object storage (one at a time on a local disk)


@dataclass(frozen=True)
class ColumnSpec:
    dtype: str  # numpy dtype name, little-endian
    shape: tuple[int, ...]  # one row's shape

    @property
    def row_bytes(self) -> int:
        return int(np.dtype(self.dtype).itemsize * int(np.prod(self.shape, dtype=np.int64)))


def _stack(name: str, col: np.ndarray) -> np.ndarray:
    """A batch column as one ndarray (N, ...): Ray Data hands equal-length lists as an object array of arrays."""
    if col.dtype == object:
        if len(col) == 0:
            return np.zeros((0,), dtype=np.int64)
        lengths = {np.shape(x) for x in col}
        if len(lengths) > 1:
            raise ValueError(
                f"training rows must all have the same length; column {name!r} has rows of shapes "
                f"{sorted(lengths)[:5]} (pad or pack the rows to one length)"
            )
        return np.stack(col)
    return col


class RowStoreWriter:
    """Appends batches ``{column: (n, ...)}`` to a new store at ``path`` (anything already there is replaced)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.fs, self.base = filesystem(path)
        self.fs.create_dir(self.base, recursive=True)
        self.fs.delete_dir_contents(self.base, missing_dir_ok=True)
        self.specs: dict[str, ColumnSpec] = {}
        self.streams: dict[str, Any] = {}
        self.n_rows = 0

    def add(self, batch: dict[str, np.ndarray]) -> None:
        cols = {k: _stack(k, np.asarray(v) if not isinstance(v, np.ndarray) else v) for k, v in batch.items()}
        if not cols:
            return
        ns = {len(v) for v in cols.values()}
        if len(ns) != 1:
            raise ValueError(f"a batch's columns have different row counts {sorted(ns)}")
        n = ns.pop()
        if n == 0:
            return
        if not self.specs:
            for k, v in cols.items():
                if v.dtype.kind not in "iuf b":
                    raise ValueError(f"column {k!r} has dtype {v.dtype}; training rows need numeric columns")
                self.specs[k] = ColumnSpec(v.dtype.newbyteorder("<").name, tuple(int(d) for d in v.shape[1:]))
                self.streams[k] = self.fs.open_output_stream(f"{self.base}/{k}.bin")
        if set(cols) != set(self.specs):
            raise ValueError(f"a batch has columns {sorted(cols)} but the first had {sorted(self.specs)}")
        for k, v in cols.items():
            spec = self.specs[k]
            if tuple(v.shape[1:]) != spec.shape:
                raise ValueError(
                    f"training rows must all have the same length; column {k!r} has rows of shape "
                    f"{tuple(v.shape[1:])} after rows of shape {spec.shape} (pad or pack the rows)"
                )
            self.streams[k].write(np.ascontiguousarray(_cast(k, v, np.dtype(spec.dtype))).data)
        self.n_rows += n

    def close(self) -> "RowStore":
        for s in self.streams.values():
            s.close()
        index = {
            "format": FORMAT,
            "n_rows": self.n_rows,
            "columns": {k: {"dtype": s.dtype, "shape": list(s.shape)} for k, s in self.specs.items()},
        }
        with self.fs.open_output_stream(f"{self.base}/{INDEX}") as f:  # last: its presence marks a finished store
            f.write(json.dumps(index).encode())
        return RowStore(self.path, index)


def _cast(name: str, v: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """``v`` in the column's dtype (fixed by its first batch); integers must fit."""
    if v.dtype == dtype:
        return v
    if v.dtype.kind in "iub" and dtype.kind in "iu" and v.size:
        info = np.iinfo(dtype)
        if v.min() < info.min or v.max() > info.max:
            raise ValueError(
                f"column {name!r}: values {v.min()}..{v.max()} do not fit {dtype} (the dtype of its "
                "first batch); give every batch the same dtype"
            )
    return v.astype(dtype)


def write_rows(batches: Iterable[dict[str, np.ndarray]], path: str, objective: Any, what: str) -> "RowStore":
    """Write ``batches`` (in order) to a store at ``path``: the objective's columns (``required`` must be present,
    checked per batch with ``what`` in the message) plus ``_units`` from ``objective.row_counts``."""
    w = RowStoreWriter(path)
    for batch in batches:
        objective.check_columns(set(batch), what)
        cols = {k: _stack(k, v) for k, v in batch.items() if k in objective.columns}
        if len(cols[objective.required[0]]) == 0:
            continue
        cols[UNITS] = np.asarray(objective.row_counts(cols), dtype=np.float32)
        w.add(cols)
    return w.close()


def array_batches(rows: dict[str, np.ndarray], batch_rows: int = 4096) -> Iterable[dict[str, np.ndarray]]:
    """In-memory rows ``{column: (N, ...)}`` as batches for ``write_rows``."""
    n = len(next(iter(rows.values()))) if rows else 0
    for lo in range(0, n, batch_rows):
        yield {k: np.asarray(v[lo : lo + batch_rows]) for k, v in rows.items()}


def dataset_batches(ds: Any, batch_rows: int = 1024) -> Iterable[dict[str, np.ndarray]]:
    """A Ray Dataset's rows in its fixed order (``preserve_order``; its own context travels with it), streaming."""
    from ray.data import DataContext

    for ctx in (DataContext.get_current(), ds.context):
        ctx.execution_options.preserve_order = True
    yield from ds.iter_batches(batch_size=batch_rows, batch_format="numpy")


class RowStore:
    """Random access to a finished store (pickles as its path + index: workers open their own files)."""

    def __init__(self, path: str, index: dict[str, Any] | None = None) -> None:
        self.path = path
        if index is None:
            fs, base = filesystem(path)
            try:
                with fs.open_input_stream(f"{base}/{INDEX}") as f:
                    index = json.loads(f.read())
            except FileNotFoundError:
                raise FileNotFoundError(
                    f"{path} is not a finished row store (no {INDEX}); the training driver "
                    "writes it before the workers start"
                ) from None
        if index.get("format") != FORMAT:
            raise ValueError(f"{path}: row store format {index.get('format')!r}, expected {FORMAT!r}")
        self.index = index
        self.n_rows = int(index["n_rows"])
        self.columns = {k: ColumnSpec(v["dtype"], tuple(v["shape"])) for k, v in index["columns"].items()}
        self._files: dict[str, Any] = {}
        self._pool: Any = None  # threads for concurrent ranged reads (object storage only)
        self.bytes_read = 0  # what this process asked the storage for (ranged reads), for the loader's accounting
        self.rows_read = 0

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "index": self.index}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"], state["index"])

    def __len__(self) -> int:
        return self.n_rows

    def nbytes(self, columns: Iterable[str] | None = None) -> int:
        """The size of the split: every row of ``columns`` (default: all but ``_units``)."""
        names = [c for c in self.columns if c != UNITS] if columns is None else list(columns)
        return sum(self.columns[c].row_bytes for c in names) * self.n_rows

    def _file(self, col: str) -> Any:
        f = self._files.get(col)
        if f is None:
            fs, base = filesystem(self.path)
            f = self._files[col] = fs.open_input_file(f"{base}/{col}.bin")  # pread / ranged GET, no mmap
        return f

    def read(self, ids: np.ndarray, columns: Iterable[str] | None = None) -> dict[str, np.ndarray]:
        """Rows ``ids`` (any order, repeats allowed) of ``columns`` (default: all but ``_units``), in the order
        given: {column: (len(ids), *shape)}. Consecutive ids are read with one ranged read."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        names = [c for c in self.columns if c != UNITS] if columns is None else list(columns)
        if ids.size and (ids.min() < 0 or ids.max() >= self.n_rows):
            raise IndexError(f"row ids {ids.min()}..{ids.max()} outside the store's {self.n_rows} rows ({self.path})")
        order = np.argsort(ids, kind="stable")
        s = ids[order]
        cuts = np.flatnonzero(np.diff(s) != 1) + 1  # runs of consecutive ids
        starts = np.concatenate([[0], cuts]).astype(np.int64)
        ends = np.concatenate([cuts, [len(s)]]).astype(np.int64)
        runs = [(int(a), int(b)) for a, b in zip(starts, ends) if b > a]
        out: dict[str, np.ndarray] = {}
        for c in names:
            spec = self.columns[c]
            rb = spec.row_bytes
            dst = np.empty((len(ids), *spec.shape), dtype=np.dtype(spec.dtype))
            f = self._file(c)

            def fetch(run: tuple[int, int], f: Any = f, rb: int = rb, dst: np.ndarray = dst) -> None:
                a, b = run
                buf = f.read_at((b - a) * rb, int(s[a]) * rb)  # one ranged read: rows s[a] .. s[a] + (b - a) - 1
                dst[order[a:b]] = np.frombuffer(buf, dtype=dst.dtype).reshape(b - a, *dst.shape[1:])

            if is_uri(self.path) and len(runs) > 1:  # object storage: latency-bound, keep several GETs in flight
                list(self._readers().map(fetch, runs))
            else:
                for run in runs:
                    fetch(run)
            self.bytes_read += len(ids) * rb
            out[c] = dst
        self.rows_read += len(ids)
        return out

    def _readers(self) -> Any:
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(REMOTE_READERS, thread_name_prefix="genloop-rows")
        return self._pool

    def read_column(self, col: str) -> np.ndarray:
        """A whole column (for ``_units``: 4 bytes a row, like the sample index); not counted as rows read."""
        counted = self.bytes_read, self.rows_read
        col_rows = self.read(np.arange(self.n_rows), [col])[col]
        self.bytes_read, self.rows_read = counted
        return col_rows


def store_path(run_dir: str, name: str, split: str) -> str:
    """Where a run keeps its row store for ``split``: ``<out>/train_runs/<name>-rows/<split>``."""
    return join(run_dir, f"{name}-rows", split)

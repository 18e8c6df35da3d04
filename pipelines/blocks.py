"""The tokenized-dataset contract between the data stage and training.

A dataset folder holds::

    manifest.json              stage "data"; config.seq_len; counts.train_blocks / counts.val_blocks
    train/part-*.parquet       column ``tokens``: list<int32> of exactly seq_len + 1 ids (documents joined by <|endoftext|>)
    val/part-*.parquet         the held-out split, same schema
    tokenizer/                 tokenizer.tiktoken + tokenizer_spec.json that made the ids

``ray.data.read_parquet(f"{dir}/train")`` reads it with no genloop code.

The data stage's last step lives here too: ``Tokenize`` (a Ray Data UDF: surviving documents -> ids +
<|endoftext|>, split by content hash) and ``BlockPacker`` (ids -> fixed blocks -> Parquet shards).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines.artifacts import ArtifactError, exists, filesystem, join, local_copy, read_manifest

TOKENS = "tokens"
TRAIN, VAL, TOKENIZER_DIR = "train", "val", "tokenizer"


@dataclass(frozen=True)
class BlocksInfo:
    path: str
    seq_len: int
    train: str
    val: str
    tokenizer: str
    train_blocks: int
    val_blocks: int

    def load_tokenizer(self) -> Any:
        """The tokenizer that made the ids (downloaded once into the local cache when the dataset is remote)."""
        from models.tokenizer import Tokenizer

        return Tokenizer.load(local_copy(self.tokenizer))


def open_dataset(path: str) -> BlocksInfo:
    """Check that ``path`` is a finished genloop tokenized dataset; clear error otherwise."""
    try:
        m = read_manifest(path)
    except ArtifactError as e:
        raise ArtifactError(f"--data {path}: {e}; make one with `genloop data ... --out DIR`") from None
    if m.get("stage") != "data":
        raise ArtifactError(
            f"--data {path} is a {m.get('stage')!r} artifact, not a tokenized dataset from `genloop data`"
        )
    if m.get("status") != "finished":
        raise ArtifactError(f"--data {path} is unfinished (status {m.get('status')!r}); re-run the data stage")
    for sub in (TRAIN, TOKENIZER_DIR):
        if not exists(join(path, sub)):
            raise ArtifactError(f"--data {path} lacks {sub}/; it is not a complete genloop tokenized dataset")
    counts = m.get("counts", {})
    return BlocksInfo(
        path=path,
        seq_len=int(m["config"]["seq_len"]),
        train=join(path, TRAIN),
        val=join(path, VAL),
        tokenizer=join(path, TOKENIZER_DIR),
        train_blocks=int(counts.get("train_blocks", 0)),
        val_blocks=int(counts.get("val_blocks", 0)),
    )


def write_shard(blocks: np.ndarray, out_dir: str, index: int) -> str:
    """Write (N, seq_len + 1) int token blocks as one Parquet shard ``part-{index:05d}.parquet``."""
    fs, base = filesystem(out_dir)
    fs.create_dir(base, recursive=True)
    arr = pa.array(list(np.asarray(blocks, dtype=np.int32)), type=pa.list_(pa.int32()))
    path = f"{base}/part-{index:05d}.parquet"
    pq.write_table(pa.table({TOKENS: arr}), path, filesystem=fs)
    return path


def write_empty_split(out_dir: str, seq_len: int) -> None:
    """An empty split is still a readable Parquet folder with the contract's schema."""
    write_shard(np.zeros((0, seq_len + 1), dtype=np.int32), out_dir, 0)


# ---- tokenize + pack (the data stage's last step) -------------------------------------------------------------------


def split_of(doc_hash: int, val_fraction: float) -> str:
    """Deterministic split by content hash: the same text is always in the same split."""
    return VAL if (doc_hash % 10_000) < val_fraction * 10_000 else TRAIN


class Tokenize:
    """Ray Data UDF: documents (``key``, ``status``, ``text``, ``hash``) -> ``(split, tokens)`` for the kept ones not
    in ``removed``, ids + <|endoftext|>, in input order."""

    def __init__(self, tokenizer: Any, removed: frozenset[str], val_fraction: float, kept: str = "kept") -> None:
        self.tok, self.removed, self.val_fraction, self.kept = tokenizer, removed, val_fraction, kept

    def __call__(self, batch: pa.Table) -> pa.Table:
        keys = batch.column("key").to_pylist()
        status = batch.column("status").to_pylist()
        idx = [i for i, (k, s) in enumerate(zip(keys, status)) if s == self.kept and k not in self.removed]
        texts = batch.column("text").take(pa.array(idx, type=pa.int64())).to_pylist() if idx else []
        hashes = batch.column("hash").to_pylist()
        ids = self.tok.encode_batch(texts) if texts else []
        for x in ids:
            x.append(self.tok.eot_id)  # documents are joined by <|endoftext|>
        return pa.table(
            {
                "split": pa.array([split_of(hashes[i], self.val_fraction) for i in idx], type=pa.string()),
                TOKENS: pa.array(ids, type=pa.list_(pa.int32())),
            }
        )


def pack_batch(batch: pa.Table, packers: dict[str, "BlockPacker"]) -> None:
    """Feed one ``Tokenize`` output batch to the per-split packers, in row order (flat token buffers, no per-row
    Python objects)."""
    for split, packer in packers.items():
        rows = batch.filter(pc.equal(batch.column("split"), split)).column(TOKENS).combine_chunks()
        if len(rows):
            packer.add(rows.flatten().to_numpy(zero_copy_only=False).astype(np.int32, copy=False))


class BlockPacker:
    """Concatenates documents' ids and cuts fixed blocks of ``seq_len + 1``, writing a shard every ``per_shard``."""

    def __init__(self, out_dir: str, seq_len: int, per_shard: int) -> None:
        self.out_dir, self.width, self.per_shard = out_dir, seq_len + 1, per_shard
        self.pending: list[np.ndarray] = []
        self.n_pending = 0
        self.blocks: list[np.ndarray] = []  # full blocks not yet written, each (n, seq_len + 1)
        self.n_blocks = self.n_shards = self.n_tokens = 0

    def add(self, ids: np.ndarray) -> None:
        self.pending.append(ids)
        self.n_pending += ids.size
        self.n_tokens += ids.size
        if self.n_pending >= self.width * 64:
            self._cut()

    def _cut(self) -> None:
        flat = np.concatenate(self.pending) if self.pending else np.zeros(0, np.int32)
        n = flat.size // self.width
        if n:
            self.blocks.append(flat[: n * self.width].reshape(n, self.width))
        rest = flat[n * self.width :]
        self.pending, self.n_pending = [rest], rest.size
        while sum(b.shape[0] for b in self.blocks) >= self.per_shard:
            self._write(self.per_shard)

    def _write(self, n: int) -> None:
        allb = np.concatenate(self.blocks)
        write_shard(allb[:n], self.out_dir, self.n_shards)
        self.n_shards += 1
        self.n_blocks += n
        self.blocks = [allb[n:]] if allb.shape[0] > n else []

    def close(self) -> int:
        """Flush; returns the number of tail tokens dropped (less than one block)."""
        self._cut()
        left = sum(b.shape[0] for b in self.blocks)
        if left:
            self._write(left)
        return self.n_pending

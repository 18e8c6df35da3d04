"""The tokenized-dataset contract between the data stage and training.

A dataset folder holds::

    manifest.json              stage "data"; config.seq_len; counts.train_blocks / counts.val_blocks
    train/part-*.parquet       column ``tokens``: list<int32> of exactly seq_len + 1 ids (documents joined by <|endoftext|>)
    val/part-*.parquet         the held-out split, same schema
    tokenizer/                 tokenizer.tiktoken + tokenizer_spec.json that made the ids

``ray.data.read_parquet(f"{dir}/train")`` reads it with no genloop code.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.artifacts import ArtifactError, exists, filesystem, join, read_manifest

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


def open_dataset(path: str) -> BlocksInfo:
    """Check that ``path`` is a finished genloop tokenized dataset; clear error otherwise."""
    try:
        m = read_manifest(path)
    except ArtifactError as e:
        raise ArtifactError(f"--data {path}: {e}; make one with `genloop data ... --out DIR`") from None
    if m.get("stage") != "data":
        raise ArtifactError(f"--data {path} is a {m.get('stage')!r} artifact, not a tokenized dataset from `genloop data`")
    if m.get("status") != "finished":
        raise ArtifactError(f"--data {path} is unfinished (status {m.get('status')!r}); re-run the data stage")
    for sub in (TRAIN, TOKENIZER_DIR):
        if not exists(join(path, sub)):
            raise ArtifactError(f"--data {path} lacks {sub}/; it is not a complete genloop tokenized dataset")
    counts = m.get("counts", {})
    return BlocksInfo(path=path, seq_len=int(m["config"]["seq_len"]), train=join(path, TRAIN), val=join(path, VAL),
                      tokenizer=join(path, TOKENIZER_DIR), train_blocks=int(counts.get("train_blocks", 0)),
                      val_blocks=int(counts.get("val_blocks", 0)))


def write_shard(blocks: np.ndarray, out_dir: str, index: int) -> str:
    """Write (N, seq_len + 1) int token blocks as one Parquet shard ``part-{index:05d}.parquet``."""
    fs, base = filesystem(out_dir)
    fs.create_dir(base, recursive=True)
    arr = pa.array(list(np.asarray(blocks, dtype=np.int32)), type=pa.list_(pa.int32()))
    path = f"{base}/part-{index:05d}.parquet"
    pq.write_table(pa.table({TOKENS: arr}), path, filesystem=fs)
    return path

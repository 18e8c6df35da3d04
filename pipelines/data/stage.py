"""``genloop data``: stream, clean, deduplicate and tokenize corpora with Ray Data into training blocks.

Pipeline (each step switchable in :class:`DataConfig`; the steps are plain code in their own modules, wrapped here by
Ray Data ``map_batches`` / ``groupby``: ``pipelines/data/inputs.py`` (which files, one file -> documents),
``data/docs.py`` (the per-document processor, rules in ``data/text.py``), ``data/dedup.py`` (hashes, MinHash LSH, the
dedup UDFs), ``pipelines/blocks.py`` (tokenize + pack, the dataset contract), ``data/accounting.py`` (counts, samples,
the end-of-run table))::

    list inputs (driver; a path matching nothing is an error before any work)
      -> read_binary_files            one row per file (path, bytes)
      -> map_batches(process_files)   split into documents (text file | JSONL line | JSON item | Parquet row),
                                      decode, cut oversize, normalise, quality rules (prose | code profile), PII,
                                      content hash + MinHash signature                     -> materialized `docs`
      -> counts pass                  read = kept + dropped per rule + malformed (+ dups below); samples per rule
      -> groupby(kind, group key)     exact groups (content hash): all but the smallest key are duplicates;
                                      LSH band buckets: candidates confirmed by signature agreement, bounded per
                                      bucket (one hash-partitioned shuffle for both)
      -> union-find (driver)          connected components over the edges; the smallest key survives
      -> tokenizer                    --tokenizer spec, or a BPE trained on a sample of the surviving text
      -> map_batches(tokenize)        ids + <|endoftext|>, train/val split by content hash
      -> pack (driver, in key order)  fixed blocks of seq_len + 1 -> train/ val/ Parquet shards (pipelines.blocks)

Document keys are ``"<path>#<index in file>"``; files are listed sorted and Ray Data preserves order here, so the
same input and config give byte-identical shards. A run that died is re-run by the same command: the unfinished
output is cleared and rebuilt. A finished output is refused unless ``overwrite=true`` (``pipelines/lifecycle.py``).
"""

from __future__ import annotations

import logging
import tempfile
import time
from typing import Any, Iterator

import pyarrow as pa

from pipelines.artifacts import filesystem, is_uri, join, local_copy, upload_dir
from pipelines.blocks import TOKENIZER_DIR, TRAIN, VAL, BlockPacker, Tokenize, pack_batch, write_empty_split
from pipelines.data.accounting import account, dup_bytes, summary_table, write_dup_samples, write_samples
from pipelines.data.config import DataConfig, check_config
from pipelines.data.dedup import EXACT_KIND, group_edges, group_rows, select_kept, survivors
from pipelines.data.docs import KEPT, process_files, unreadable_rows
from pipelines.data.inputs import STDLIB, list_inputs, stdlib_files
from pipelines.lifecycle import begin_stage

log = logging.getLogger(__name__)

__all__ = ["DataConfig", "check_config", "list_inputs", "run", "stdlib_files", "summary_table"]


def run(cfg: DataConfig) -> dict[str, Any]:
    """Run the whole data stage into ``cfg.out`` on the running Ray (the caller starts it); returns the manifest's
    counts plus ``metrics``."""
    from ray.data import DataContext

    check_config(cfg)
    if cfg.input:
        files, unreadable = list_inputs(cfg.input)
    else:
        files, unreadable = stdlib_files(cfg.stdlib_extensions), []
        if not files:
            raise FileNotFoundError("the embedded default corpus (the stdlib) has no files; pass --input")
    # no checkpoints to resume from: an unfinished run's output is cleared (so is a finished one, with overwrite)
    artifact = begin_stage(
        "data", cfg.out, cfg, inputs={"--input": list(cfg.input) or [STDLIB]}, overwrite=cfg.overwrite, resume=False
    )
    t0 = time.perf_counter()
    ctx = DataContext.get_current()
    saved_order = ctx.execution_options.preserve_order
    ctx.execution_options.preserve_order = True
    try:
        counts, metrics = _pipeline(cfg, files, unreadable)
    finally:
        ctx.execution_options.preserve_order = saved_order
    metrics["seconds"] = round(time.perf_counter() - t0, 2)
    metrics["mb_per_s"] = round(counts["bytes"]["read"] / 1e6 / max(metrics["seconds"], 1e-9), 3)
    artifact.finish(counts=counts, metrics=metrics)
    return artifact.manifest.counts | {"metrics": artifact.manifest.metrics}


def _pipeline(cfg: DataConfig, files: list[str], unreadable: list[tuple[str, str]]) -> tuple[dict, dict]:
    import ray
    import ray.data as rd

    timings: dict[str, float] = {}
    t = time.perf_counter()
    # 1. read + per-document steps, materialized once (the global steps below read it several times)
    parts = []
    if files:
        fs = filesystem(files[0])[0] if is_uri(files[0]) else None
        n_blocks = max(1, min(1024, len(files) // max(1, cfg.files_per_read_task)))
        raw = rd.read_binary_files(files, include_paths=True, filesystem=fs, override_num_blocks=n_blocks)
        parts.append(
            raw.map_batches(process_files, fn_kwargs={"cfg": cfg}, batch_size=cfg.batch_size, batch_format="pyarrow")
        )
    if unreadable:
        parts.append(rd.from_arrow(unreadable_rows(unreadable)))
    docs = (parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]).materialize()
    timings["read_clean"] = time.perf_counter() - t

    # 2. accounting pass (driver, slim columns): counts, bytes, samples per rule, malformed list
    t = time.perf_counter()
    acct = account(_blocks(docs), cfg.samples_per_rule, cfg.max_listed_malformed)
    timings["account"] = time.perf_counter() - t

    # 3.+4. exact and near duplicates in one hash-partitioned groupby over (kind, group key): exact groups by content
    # hash, LSH band buckets; edges -> connected components on the driver (the smallest key of each survives)
    t = time.perf_counter()
    parts_n = cfg.shuffle_partitions or max(
        int(ray.cluster_resources().get("CPU", 1)), min(200, acct["kept_pre_dedup"] // 20_000)
    )
    exact: set[str] = set()
    near: set[str] = set()
    n_edges = 0
    survivor_of: dict[str, str] = {}
    if (cfg.exact_dedup or cfg.minhash.enabled) and acct["kept_pre_dedup"] > 1:
        kept = docs.map_batches(
            select_kept, fn_kwargs={"columns": ["key", "hash", "sig"], "kept": KEPT}, batch_format="pyarrow"
        )
        rows = kept.map_batches(
            group_rows, fn_kwargs={"mh": cfg.minhash, "exact": cfg.exact_dedup}, batch_format="pyarrow"
        )
        edges_ds = rows.groupby(["kind", "gkey"], num_partitions=parts_n).map_groups(
            group_edges, fn_kwargs={"mh": cfg.minhash}, batch_format="pyarrow"
        )
        edges: set[tuple[str, str]] = set()
        for b in edges_ds.iter_batches(batch_format="pyarrow", batch_size=None):
            d = b.to_pydict()
            for kind, a, bb in zip(d["kind"], d["a"], d["b"]):
                edges.add((a, bb))
                if kind == EXACT_KIND:
                    exact.add(bb)
        n_edges = len(edges)
        # exact duplicates have identical signatures, so they sit in their survivor's component: near = the rest
        survivor_of = survivors(sorted(edges))
        near = set(survivor_of) - exact
    timings["dedup"] = time.perf_counter() - t
    removed = frozenset(exact | near)

    # 5. tokenizer: the given spec, or a BPE trained on a sample of what survived
    t = time.perf_counter()
    tok = _tokenizer(cfg, docs, removed)
    _save_tokenizer(tok, join(cfg.out, TOKENIZER_DIR))
    timings["tokenizer"] = time.perf_counter() - t

    # 6. tokenize (parallel, order kept) and pack on the driver into train/ and val/ shards
    t = time.perf_counter()
    packers = {s: BlockPacker(join(cfg.out, s), cfg.seq_len, cfg.blocks_per_shard) for s in (TRAIN, VAL)}
    toks = docs.map_batches(
        Tokenize,
        fn_constructor_kwargs={"tokenizer": tok, "removed": removed, "val_fraction": cfg.val_fraction, "kept": KEPT},
        batch_size=256,
        batch_format="pyarrow",
        compute=rd.ActorPoolStrategy(min_size=1, max_size=_tokenize_actors()),
    )
    n_docs_tok = 0
    for batch in toks.iter_batches(batch_format="pyarrow", batch_size=None):
        n_docs_tok += batch.num_rows
        pack_batch(batch, packers)
    tail = {s: p.close() for s, p in packers.items()}
    timings["tokenize_pack"] = time.perf_counter() - t
    if packers[TRAIN].n_blocks == 0:
        raise ValueError(
            f"no training blocks: only {packers[TRAIN].n_tokens} train tokens survived cleaning, fewer "
            f"than one block of seq_len+1={cfg.seq_len + 1}; add --input data or lower seq_len"
        )
    if packers[VAL].n_blocks == 0:
        log.warning(
            "no validation blocks (val_fraction=%s, %d val tokens); raise val_fraction for a val split",
            cfg.val_fraction,
            packers[VAL].n_tokens,
        )
        write_empty_split(join(cfg.out, VAL), cfg.seq_len)

    write_samples(cfg.out, acct["samples"])
    write_dup_samples(cfg.out, "exact_duplicates", sorted(exact)[: cfg.samples_per_rule], survivor_of)
    write_dup_samples(cfg.out, "near_duplicates", sorted(near)[: cfg.samples_per_rule], survivor_of)
    bytes_ = acct["bytes"]
    dup_in, dup_text = dup_bytes(_blocks(docs), exact, near)
    bytes_["exact_duplicates"], bytes_["near_duplicates"] = dup_in["exact"], dup_in["near"]
    bytes_["kept"] = bytes_.pop("kept_pre_dedup") - bytes_["exact_duplicates"] - bytes_["near_duplicates"]
    counts = {
        "files": len(files) + len(unreadable),
        "read": acct["read"],
        "kept": acct["kept_pre_dedup"] - len(exact) - len(near),
        "dropped": dict(sorted(acct["dropped"].items())),
        "exact_duplicates": len(exact),
        "near_duplicates": len(near),
        "malformed": dict(sorted(acct["malformed"].items())),
        "cut": acct["cut"],
        "pii_redactions": acct["pii"],
        "bytes": bytes_,
        "kept_text_bytes": acct["kept_text_bytes"] - dup_text,
        "profiles": acct["profiles"],
        "tokenized_docs": n_docs_tok,
        "tokens": {s: p.n_tokens for s, p in packers.items()},
        "tail_tokens_dropped": tail,
        "train_blocks": packers[TRAIN].n_blocks,
        "val_blocks": packers[VAL].n_blocks,
        "train_shards": packers[TRAIN].n_shards,
        "val_shards": packers[VAL].n_shards,
        "n_vocab": tok.n_vocab,
    }
    metrics = {
        "timings_s": {k: round(v, 2) for k, v in timings.items()},
        "near_dup_edges": n_edges,
        "tokenizer": tok.name,
        "malformed_docs": acct["malformed_list"],
    }
    return counts, metrics


def _tokenize_actors() -> int:
    """Tokenizer actors: half the cluster's CPUs (the driver packs blocks meanwhile), at least one."""
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 2)) // 2)


def _blocks(docs: Any) -> Iterator[pa.Table]:
    """The materialized docs' blocks, in order, straight from the object store (no extra Ray Data tasks)."""
    yield from docs.iter_batches(batch_format="pyarrow", batch_size=None, prefetch_batches=2)


def _tokenizer(cfg: DataConfig, docs: Any, removed: frozenset[str]) -> Any:
    from models.tokenizer import Tokenizer, train

    if cfg.tokenizer:  # a folder / spec (local or URI, fetched once) or a named encoding
        return Tokenizer.load(local_copy(cfg.tokenizer))

    def sample() -> Iterator[str]:
        total = 0
        for b in _blocks(docs):
            for key, st, text in zip(*(b.column(c).to_pylist() for c in ("key", "status", "text"))):
                if st == KEPT and key not in removed:
                    yield text
                    total += len(text)
                    if total >= cfg.tokenizer_sample_bytes:
                        return

    texts = list(sample())
    log.info(
        "training a BPE tokenizer (vocab %d) on %d documents, %.1f MB",
        cfg.vocab_size,
        len(texts),
        sum(map(len, texts)) / 1e6,
    )
    return train(texts, cfg.vocab_size, name="genloop-bpe")


def _save_tokenizer(tok: Any, uri: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        upload_dir(tok.save(tmp), uri)

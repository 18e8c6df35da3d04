"""``genloop data``: stream, clean, deduplicate and tokenize corpora with Ray Data into training blocks.

Pipeline (each step switchable in :class:`DataConfig`; per-document work is plain functions in ``data_text`` /
``data_dedup``, wrapped here by Ray Data ``map_batches`` / ``groupby``)::

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
output is cleared and rebuilt. A finished output is refused unless ``overwrite=true``.
"""

from __future__ import annotations

import fnmatch
import glob
import json
import logging
import os
import sysconfig
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipelines.artifacts import Manifest, filesystem, join, write_text
from pipelines.blocks import TOKENIZER_DIR, TRAIN, VAL, write_shard
from pipelines.data_dedup import (MinHashConfig, band_keys, bucket_edges, content_hash, permutations,
                                  shingle_hashes, signature, survivors)
from pipelines.data_text import CodeRules, ProseRules, code_filter, normalise, prose_filter, redact_pii

log = logging.getLogger(__name__)

STDLIB = "<stdlib>"
JSONL_EXT = (".jsonl", ".ndjson")
JSON_EXT = (".json",)
PARQUET_EXT = (".parquet",)
KEPT, DROPPED, MALFORMED = "kept", "dropped", "malformed"


@dataclass
class DataConfig:
    """The data stage's slice of a preset (``data:`` section)."""

    input: list[str] = field(default_factory=list)   # files / folders / globs / s3:// gs:// URIs; [] = the stdlib
    out: str = "runs/data"
    tokenizer: str = ""                 # folder / spec / named encoding (cl100k_base); "" = train a BPE here
    vocab_size: int = 8192              # for the trained BPE, chat specials included
    tokenizer_sample_bytes: int = 8_000_000
    seq_len: int = 256
    val_fraction: float = 0.05          # by content hash, so a document is in one split only
    blocks_per_shard: int = 8192
    text_field: str = "text"            # JSONL / JSON / Parquet column holding the document
    code_extensions: list[str] = field(default_factory=lambda: [
        ".py", ".pyi", ".c", ".h", ".cc", ".cpp", ".hpp", ".js", ".ts", ".go", ".rs", ".java", ".sh", ".toml",
        ".cfg", ".ini", ".yaml", ".yml"])   # these files use the `code` profile; everything else `prose`
    stdlib_extensions: list[str] = field(default_factory=lambda: [".py", ".txt", ".rst"])
    max_doc_bytes: int = 1_000_000      # a longer document is cut to this many bytes (counted as cut)
    normalise: bool = True
    quality: bool = True
    pii: bool = True                    # e-mail / IP addresses -> <EMAIL> / <IP_ADDRESS>
    exact_dedup: bool = True
    minhash: MinHashConfig = field(default_factory=MinHashConfig)
    prose: ProseRules = field(default_factory=ProseRules)
    code: CodeRules = field(default_factory=CodeRules)
    samples_per_rule: int = 5           # dropped/<rule>.jsonl: what each rule removed, for inspection
    max_listed_malformed: int = 1000    # manifest lists malformed documents (source + reason) up to this many
    batch_size: int = 32                # files per process_files batch
    files_per_read_task: int = 32       # read_binary_files blocks = files / this (clamped to 1 .. 1024)
    shuffle_partitions: int = 0         # hash partitions of the dedup groupbys; 0 = auto (docs / 20k, >= CPUs)
    overwrite: bool = False


# ---- inputs ------------------------------------------------------------------------------------------------------


def stdlib_files(extensions: list[str]) -> list[str]:
    """The embedded default corpus: this Python's standard library sources and docs (not site-packages)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "dist-packages", "__pycache__"))
        out += [os.path.join(dirpath, f) for f in filenames if os.path.splitext(f)[1] in extensions]
    return sorted(out)


def list_inputs(inputs: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """(readable files, [(path, reason)] unreadable) for files / folders / globs / URIs, sorted and unique.

    Raises FileNotFoundError naming the first pattern that matches nothing, before any work starts.
    """
    files: set[str] = set()
    unreadable: list[tuple[str, str]] = []
    for pattern in inputs:
        matched = _expand(pattern)
        if not matched:
            raise FileNotFoundError(f"--input {pattern} matches no files; give existing files, folders, globs or "
                                    "s3:// / gs:// URIs")
        files.update(matched)
    readable = []
    for f in sorted(files):
        if "://" not in f and not os.access(f, os.R_OK):
            unreadable.append((f, "unreadable"))
        else:
            readable.append(f)
    return readable, unreadable


def _expand(pattern: str) -> list[str]:
    if "://" not in pattern:
        p = Path(pattern)
        if p.is_dir():
            return [str(f) for f in p.rglob("*") if f.is_file()]
        return [f for f in glob.glob(pattern, recursive=True) if os.path.isfile(f)]
    fs, path = filesystem(pattern)
    scheme = pattern.split("://", 1)[0] + "://"
    has_glob = any(c in path for c in "*?[")
    base = path.split("*", 1)[0].split("?", 1)[0].split("[", 1)[0].rsplit("/", 1)[0] if has_glob else path
    info = fs.get_file_info(base)
    if info.type == pafs.FileType.File and not has_glob:
        return [pattern]
    if info.type != pafs.FileType.Directory:
        return []
    entries = fs.get_file_info(pafs.FileSelector(base, recursive=True))
    names = [e.path for e in entries if e.type == pafs.FileType.File]
    if has_glob:
        names = [n for n in names if fnmatch.fnmatch(n, path)]
    return [scheme + n for n in names]


# ---- per-document processing (plain functions; map_batches wraps them) --------------------------------------------

DOC_SCHEMA = pa.schema([
    ("key", pa.string()), ("status", pa.string()), ("reason", pa.string()), ("profile", pa.string()),
    ("n_bytes_in", pa.int64()), ("n_bytes", pa.int64()), ("cut", pa.bool_()), ("pii", pa.int32()),
    ("text", pa.string()), ("sample", pa.string()), ("hash", pa.int64()), ("sig", pa.list_(pa.uint32())),
])


def split_documents(path: str, data: bytes, cfg: DataConfig) -> Iterator[tuple[str, bytes | str | None, str]]:
    """(key, raw document, malformed reason or "") for each document of one file.

    Text / source file -> one document (bytes); JSONL -> one per non-blank line; JSON -> one per list item (or the
    object); Parquet -> one per row of ``text_field``. A broken record is yielded with its reason, never raised.
    """
    low = path.lower()
    if low.endswith(PARQUET_EXT):
        try:
            table = pq.read_table(pa.BufferReader(data))
        except Exception as e:  # pyarrow raises several types for corrupt files
            yield f"{path}#{0:08d}", None, f"bad_parquet: {type(e).__name__}"
            return
        if cfg.text_field not in table.column_names:
            yield f"{path}#{0:08d}", None, f"no_text_field: {cfg.text_field!r} not in {table.column_names[:8]}"
            return
        for i, v in enumerate(table.column(cfg.text_field).to_pylist()):
            yield (f"{path}#{i:08d}", v, "") if isinstance(v, str) else (f"{path}#{i:08d}", None, "no_text_field")
        return
    if low.endswith(JSONL_EXT):
        for i, line in enumerate(data.split(b"\n")):
            if line.strip():
                yield (f"{path}#{i:08d}",) + _json_record(line, cfg.text_field)
        return
    if low.endswith(JSON_EXT):
        key = f"{path}#{0:08d}"
        try:
            obj = json.loads(data)
        except (UnicodeDecodeError, ValueError):
            yield key, None, "bad_json"
            return
        items = obj if isinstance(obj, list) else [obj]
        for i, item in enumerate(items):
            text = item.get(cfg.text_field) if isinstance(item, dict) else None
            yield (f"{path}#{i:08d}", text, "") if isinstance(text, str) else (f"{path}#{i:08d}", None, "no_text_field")
        return
    yield f"{path}#{0:08d}", data, ""


def _json_record(line: bytes, text_field: str) -> tuple[str | None, str]:
    try:
        obj = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError:
        return None, "invalid_utf8"
    except ValueError:
        return None, "bad_json"
    text = obj.get(text_field) if isinstance(obj, dict) else None
    if not isinstance(text, str):
        return None, "no_text_field"
    return text, ""


def decode_document(raw: bytes | str, max_bytes: int) -> tuple[str | None, str, bool]:
    """(text, malformed reason or "", cut?) — binary (NUL bytes) and invalid UTF-8 are malformed; long ones cut."""
    if isinstance(raw, str):
        data = raw.encode("utf-8", errors="surrogatepass")
    else:
        data = raw
        if b"\x00" in data[:8192]:
            return None, "binary", False
    cut = len(data) > max_bytes
    if not isinstance(raw, str):
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            return None, "invalid_utf8", False
    if cut:
        data = data[:max_bytes]
    try:
        return data.decode("utf-8", errors="ignore" if cut else "strict"), "", cut
    except UnicodeDecodeError:
        return None, "invalid_utf8", False


class DocProcessor:
    """One document through decode -> normalise -> quality rules -> PII -> hash + MinHash; a ``DOC_SCHEMA`` row."""

    def __init__(self, cfg: DataConfig) -> None:
        self.cfg = cfg
        self.code_ext = tuple(e.lower() for e in cfg.code_extensions)
        self.perms = permutations(cfg.minhash.num_perm, cfg.minhash.seed)

    def profile_for(self, path: str) -> str:
        low = path.lower()
        if low.endswith(JSONL_EXT + JSON_EXT + PARQUET_EXT):
            return "prose"
        return "code" if low.endswith(self.code_ext) else "prose"

    def __call__(self, key: str, raw: bytes | str | None, bad: str, profile: str) -> dict[str, Any]:
        cfg = self.cfg
        n_in = len(raw.encode("utf-8", errors="surrogatepass")) if isinstance(raw, str) else len(raw or b"")
        row: dict[str, Any] = dict(key=key, status=MALFORMED, reason=bad, profile=profile, n_bytes_in=n_in,
                                   n_bytes=0, cut=False, pii=0, text=None, sample=None, hash=0, sig=[])
        if bad:
            return row
        text, bad, cut = decode_document(raw, cfg.max_doc_bytes)
        row["cut"] = cut
        if text is None:
            row["reason"] = bad
            return row
        if cfg.normalise:
            text = normalise(text, collapse_spaces=profile == "prose")
        if not text.strip():
            row["reason"] = "empty"
            return row
        if cfg.quality:
            if profile == "code":
                why = code_filter(text, cfg.code)
            else:
                text, why = prose_filter(text, cfg.prose)
            if why:
                row.update(status=DROPPED, reason=why, sample=text[:500])
                return row
        if cfg.pii:
            text, row["pii"] = redact_pii(text)
        sig = signature(shingle_hashes(text, cfg.minhash.ngram), *self.perms) if cfg.minhash.enabled else []
        row.update(status=KEPT, text=text, n_bytes=len(text.encode("utf-8", errors="surrogatepass")),
                   hash=content_hash(text), sig=np.asarray(sig, dtype=np.uint32).tolist())
        return row


def process_files(batch: pa.Table, cfg: DataConfig) -> pa.Table:
    """Ray Data UDF: a batch of files (``path``, ``bytes``) -> one ``DOC_SCHEMA`` row per document."""
    proc = DocProcessor(cfg)
    rows = []
    for path, data in zip(batch.column("path").to_pylist(), batch.column("bytes").to_pylist()):
        profile = proc.profile_for(path)
        for key, raw, bad in split_documents(path, data, cfg):
            rows.append(proc(key, raw, bad, profile))
    return pa.Table.from_pylist(rows, schema=DOC_SCHEMA)


def unreadable_rows(files: list[tuple[str, str]]) -> pa.Table:
    rows = [dict(key=f"{p}#{0:08d}", status=MALFORMED, reason=why, profile="", n_bytes_in=0, n_bytes=0, cut=False,
                 pii=0, text=None, sample=None, hash=0, sig=[]) for p, why in files]
    return pa.Table.from_pylist(rows, schema=DOC_SCHEMA)


# ---- dedup UDFs ----------------------------------------------------------------------------------------------------


def select_kept(batch: pa.Table, columns: list[str]) -> pa.Table:
    import pyarrow.compute as pc

    return batch.filter(pc.equal(batch.column("status"), KEPT)).select(columns)


EXACT_KIND, BAND_KIND = 0, 1


def group_rows(batch: pa.Table, mh: MinHashConfig, exact: bool) -> pa.Table:
    """Kept documents -> dedup group rows ``(kind, gkey, key, sig)``: one exact row keyed by the content hash
    (``kind`` 0) and, with MinHash on, one row per LSH band keyed by the band's bucket (``kind`` 1)."""
    kinds, gkeys, keys, sigs = [], [], [], []
    no_sig = np.zeros(0, dtype=np.uint32)
    for key, h, sig in zip(batch.column("key").to_pylist(), batch.column("hash").to_pylist(),
                           batch.column("sig").to_numpy(zero_copy_only=False)):
        if exact:
            kinds.append(EXACT_KIND)
            gkeys.append(h)
            keys.append(key)
            sigs.append(no_sig)
        if mh.enabled:
            sig = np.asarray(sig, dtype=np.uint32)
            bk = band_keys(sig, mh.bands, mh.rows).view(np.int64)     # (bands,) bucket keys as int64 bit patterns
            kinds += [BAND_KIND] * bk.size
            gkeys += bk.tolist()
            keys += [key] * bk.size
            sigs += [sig] * bk.size
    return pa.table({"kind": pa.array(kinds, type=pa.int8()), "gkey": pa.array(gkeys, type=pa.int64()),
                     "key": pa.array(keys, type=pa.string()),
                     "sig": pa.array([x.tolist() for x in sigs], type=pa.list_(pa.uint32()))})


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
    return pa.table({"kind": pa.array([kind] * len(edges), type=pa.int8()),
                     "a": pa.array([e[0] for e in edges], type=pa.string()),
                     "b": pa.array([e[1] for e in edges], type=pa.string())})


# ---- tokenize + pack -------------------------------------------------------------------------------------------------


def split_of(doc_hash: int, val_fraction: float) -> str:
    """Deterministic split by content hash: the same text is always in the same split."""
    return VAL if (doc_hash % 10_000) < val_fraction * 10_000 else TRAIN


class Tokenize:
    """Ray Data UDF: surviving documents -> (split, token ids + <|endoftext|>), in input order."""

    def __init__(self, tokenizer: Any, removed: frozenset[str], val_fraction: float) -> None:
        self.tok, self.removed, self.val_fraction = tokenizer, removed, val_fraction

    def __call__(self, batch: pa.Table) -> pa.Table:
        keys = batch.column("key").to_pylist()
        status = batch.column("status").to_pylist()
        idx = [i for i, (k, s) in enumerate(zip(keys, status)) if s == KEPT and k not in self.removed]
        texts = batch.column("text").take(pa.array(idx, type=pa.int64())).to_pylist() if idx else []
        hashes = batch.column("hash").to_pylist()
        ids = self.tok.encode_batch(texts) if texts else []
        eot = self.tok.eot_id
        for x in ids:
            x.append(eot)                       # documents are joined by <|endoftext|>
        tokens = ids
        return pa.table({"split": pa.array([split_of(hashes[i], self.val_fraction) for i in idx], type=pa.string()),
                         "tokens": pa.array(tokens, type=pa.list_(pa.int32()))})


def pack_batch(batch: pa.Table, packers: dict[str, "BlockPacker"]) -> None:
    """Feed one ``Tokenize`` output batch to the per-split packers, in row order (flat token buffers, no per-row
    Python objects)."""
    import pyarrow.compute as pc

    for split, packer in packers.items():
        rows = batch.filter(pc.equal(batch.column("split"), split)).column("tokens").combine_chunks()
        if len(rows):
            packer.add(rows.flatten().to_numpy(zero_copy_only=False).astype(np.int32, copy=False))


class BlockPacker:
    """Concatenates documents' ids and cuts fixed blocks of ``seq_len + 1``, writing a shard every ``per_shard``."""

    def __init__(self, out_dir: str, seq_len: int, per_shard: int) -> None:
        self.out_dir, self.width, self.per_shard = out_dir, seq_len + 1, per_shard
        self.pending: list[np.ndarray] = []
        self.n_pending = 0
        self.blocks: list[np.ndarray] = []     # full blocks not yet written
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
        rest = flat[n * self.width:]
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


# ---- the run -------------------------------------------------------------------------------------------------------


def run(cfg: DataConfig) -> dict[str, Any]:
    """Run the whole data stage into ``cfg.out``; returns the manifest's counts. Ray must be initialised (or is
    started embedded)."""
    import ray

    from cluster.runtime import init_ray

    _check_config(cfg)
    if cfg.input:
        files, unreadable = list_inputs(cfg.input)
    else:
        files, unreadable = stdlib_files(cfg.stdlib_extensions), []
        if not files:
            raise FileNotFoundError("the embedded default corpus (the stdlib) has no files; pass --input")
    manifest = Manifest.begin("data", cfg.out, cfg, inputs=list(cfg.input) or [STDLIB], overwrite=cfg.overwrite)
    _clear_outputs(cfg.out)
    init_ray()
    t0 = time.perf_counter()
    from ray.data import DataContext

    ctx = DataContext.get_current()
    saved_order = ctx.execution_options.preserve_order
    ctx.execution_options.preserve_order = True
    try:
        counts, metrics = _pipeline(cfg, files, unreadable, ray)
    finally:
        ctx.execution_options.preserve_order = saved_order
    metrics["seconds"] = round(time.perf_counter() - t0, 2)
    metrics["mb_per_s"] = round(counts["bytes"]["read"] / 1e6 / max(metrics["seconds"], 1e-9), 3)
    manifest.finish(counts=counts, metrics=metrics)
    return manifest.counts | {"metrics": manifest.metrics}


def _check_config(cfg: DataConfig) -> None:
    mh = cfg.minhash
    if mh.enabled and mh.num_perm < mh.bands * mh.rows:
        raise ValueError(f"minhash.num_perm={mh.num_perm} < minhash.bands*minhash.rows={mh.bands * mh.rows}; "
                         "raise num_perm or lower bands/rows")
    if cfg.seq_len < 1 or cfg.blocks_per_shard < 1:
        raise ValueError("seq_len and blocks_per_shard must be >= 1")
    if not 0.0 <= cfg.val_fraction < 1.0:
        raise ValueError(f"val_fraction={cfg.val_fraction} must be in [0, 1)")


def _clear_outputs(out: str) -> None:
    """A re-run of an unfinished (or overwritten) output starts from a clean folder (the manifest is kept)."""
    fs, base = filesystem(out)
    for sub in (TRAIN, VAL, TOKENIZER_DIR, "dropped"):
        p = f"{base}/{sub}"
        if fs.get_file_info(p).type == pafs.FileType.Directory:
            fs.delete_dir(p)


def _pipeline(cfg: DataConfig, files: list[str], unreadable: list[tuple[str, str]], ray: Any) -> tuple[dict, dict]:
    import ray.data as rd

    timings: dict[str, float] = {}
    t = time.perf_counter()
    # 1. read + per-document steps, materialized once (the global steps below read it several times)
    fs, _ = filesystem(files[0]) if files else (None, None)
    parts = []
    if files:
        remote = "://" in files[0]
        n_blocks = max(1, min(1024, len(files) // max(1, cfg.files_per_read_task)))
        raw = rd.read_binary_files(files, include_paths=True, filesystem=fs if remote else None,
                                   override_num_blocks=n_blocks)
        parts.append(raw.map_batches(process_files, fn_kwargs={"cfg": cfg}, batch_size=cfg.batch_size,
                                     batch_format="pyarrow"))
    if unreadable:
        parts.append(rd.from_arrow(unreadable_rows(unreadable)))
    docs = (parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]).materialize()
    timings["read_clean"] = time.perf_counter() - t

    # 2. accounting pass (driver, slim columns): counts, bytes, samples per rule, malformed list
    t = time.perf_counter()
    acct = _account(docs, cfg)
    timings["account"] = time.perf_counter() - t

    # 3.+4. exact and near duplicates in one hash-partitioned groupby over (kind, group key): exact groups by content
    # hash, LSH band buckets; edges -> connected components on the driver (the smallest key of each survives)
    t = time.perf_counter()
    parts_n = cfg.shuffle_partitions or max(int(ray.cluster_resources().get("CPU", 1)),
                                            min(200, acct["kept_pre_dedup"] // 20_000))
    exact: set[str] = set()
    near: set[str] = set()
    n_edges = 0
    survivor_of: dict[str, str] = {}
    if (cfg.exact_dedup or cfg.minhash.enabled) and acct["kept_pre_dedup"] > 1:
        kept = docs.map_batches(select_kept, fn_kwargs={"columns": ["key", "hash", "sig"]}, batch_format="pyarrow")
        rows = kept.map_batches(group_rows, fn_kwargs={"mh": cfg.minhash, "exact": cfg.exact_dedup},
                                batch_format="pyarrow")
        edges_ds = rows.groupby(["kind", "gkey"], num_partitions=parts_n).map_groups(
            group_edges, fn_kwargs={"mh": cfg.minhash}, batch_format="pyarrow")
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
    metrics_edges = n_edges
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
    toks = docs.map_batches(Tokenize, fn_constructor_kwargs={"tokenizer": tok, "removed": removed,
                                                             "val_fraction": cfg.val_fraction},
                            batch_size=256, batch_format="pyarrow",
                            compute=rd.ActorPoolStrategy(min_size=1, max_size=_tokenize_actors(ray)))
    n_docs_tok = 0
    for batch in toks.iter_batches(batch_format="pyarrow", batch_size=None):
        n_docs_tok += batch.num_rows
        pack_batch(batch, packers)
    tail = {s: p.close() for s, p in packers.items()}
    timings["tokenize_pack"] = time.perf_counter() - t
    if packers[TRAIN].n_blocks == 0:
        raise ValueError(f"no training blocks: only {packers[TRAIN].n_tokens} train tokens survived cleaning, fewer "
                         f"than one block of seq_len+1={cfg.seq_len + 1}; add --input data or lower seq_len")
    if packers[VAL].n_blocks == 0:
        log.warning("no validation blocks (val_fraction=%s, %d val tokens); raise val_fraction for a val split",
                    cfg.val_fraction, packers[VAL].n_tokens)
        _ensure_empty_split(join(cfg.out, VAL), cfg.seq_len)

    _write_samples(cfg.out, acct["samples"])
    _write_dup_samples(cfg.out, "exact_duplicates", sorted(exact)[: cfg.samples_per_rule], survivor_of)
    _write_dup_samples(cfg.out, "near_duplicates", sorted(near)[: cfg.samples_per_rule], survivor_of)
    bytes_ = acct["bytes"]
    dup_in, dup_text = _dup_bytes(docs, exact, near)
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
    metrics = {"timings_s": {k: round(v, 2) for k, v in timings.items()}, "near_dup_edges": metrics_edges,
               "tokenizer": tok.name, "malformed_docs": acct["malformed_list"]}
    return counts, metrics


def _tokenize_actors(ray: Any) -> int:
    """Tokenizer actors: half the cluster's CPUs (the driver packs blocks meanwhile), at least one."""
    return max(1, int(ray.cluster_resources().get("CPU", 2)) // 2)


def _blocks(docs: Any) -> Iterator[pa.Table]:
    """The materialized docs' blocks, in order, straight from the object store (no extra Ray Data tasks)."""
    yield from docs.iter_batches(batch_format="pyarrow", batch_size=None, prefetch_batches=2)


def _account(docs: Any, cfg: DataConfig) -> dict[str, Any]:
    """One pass over the slim columns: counts and input bytes per status/reason, samples, malformed list."""
    read = kept = cut = pii = kept_text = 0
    dropped: Counter[str] = Counter()
    malformed: Counter[str] = Counter()
    profiles: Counter[str] = Counter()
    byts: Counter[str] = Counter()
    samples: dict[str, list[dict]] = defaultdict(list)
    malformed_list: list[dict[str, str]] = []
    cols = ["key", "status", "reason", "profile", "n_bytes_in", "n_bytes", "cut", "pii", "sample"]
    for b in _blocks(docs):
        d = b.select(cols).to_pydict()
        for key, st, why, prof, n_in, n_out, c, p, smp in zip(*(d[c] for c in cols)):
            read += 1
            byts["read"] += n_in
            cut += bool(c)
            if st == KEPT:
                kept += 1
                pii += p
                kept_text += n_out
                profiles[prof] += 1
                byts["kept_pre_dedup"] += n_in
            elif st == DROPPED:
                dropped[why] += 1
                byts["dropped"] += n_in
                if len(samples[why]) < cfg.samples_per_rule:
                    samples[why].append({"key": key, "sample": smp})
            else:
                reason = why.split(":", 1)[0]
                malformed[reason] += 1
                byts["malformed"] += n_in
                if len(malformed_list) < cfg.max_listed_malformed:
                    malformed_list.append({"source": key.rsplit("#", 1)[0], "key": key, "reason": why})
    return {
        "read": read, "kept_pre_dedup": kept, "dropped": dropped, "malformed": malformed, "cut": cut, "pii": pii,
        "profiles": dict(profiles), "bytes": dict(byts) | {k: byts.get(k, 0) for k in ("dropped", "malformed",
                                                                                         "kept_pre_dedup")},
        "kept_text_bytes": kept_text, "samples": samples, "malformed_list": malformed_list,
    }


def _dup_bytes(docs: Any, exact: set[str], near: set[str]) -> tuple[dict[str, int], int]:
    """({"exact": input bytes, "near": input bytes}, normalised text bytes) of the removed duplicates."""
    out = {"exact": 0, "near": 0}
    text = 0
    if not exact and not near:
        return out, 0
    for b in _blocks(docs):
        for key, n_in, n_out in zip(*(b.column(c).to_pylist() for c in ("key", "n_bytes_in", "n_bytes"))):
            which = "exact" if key in exact else "near" if key in near else None
            if which:
                out[which] += n_in
                text += n_out
    return out, text


def _tokenizer(cfg: DataConfig, docs: Any, removed: frozenset[str]) -> Any:
    from models.tokenizer import Tokenizer, train

    if cfg.tokenizer:
        return Tokenizer.load(cfg.tokenizer)

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
    log.info("training a BPE tokenizer (vocab %d) on %d documents, %.1f MB", cfg.vocab_size, len(texts),
             sum(map(len, texts)) / 1e6)
    return train(texts, cfg.vocab_size, name="genloop-bpe")


def _save_tokenizer(tok: Any, uri: str) -> None:
    if "://" not in uri:
        tok.save(uri)
        return
    fs, base = filesystem(uri)
    fs.create_dir(base, recursive=True)
    with tempfile.TemporaryDirectory() as tmp:
        for f in tok.save(tmp).iterdir():
            with fs.open_output_stream(f"{base}/{f.name}") as out:
                out.write(f.read_bytes())


def _ensure_empty_split(out_dir: str, seq_len: int) -> None:
    """An empty split is still a readable Parquet folder with the contract's schema."""
    write_shard(np.zeros((0, seq_len + 1), dtype=np.int32), out_dir, 0)


def _write_samples(out: str, samples: dict[str, list[dict]]) -> None:
    for rule, rows in sorted(samples.items()):
        write_text(join(out, "dropped", f"{rule}.jsonl"), "".join(json.dumps(r) + "\n" for r in rows))


def _write_dup_samples(out: str, name: str, keys: list[str], survivor_of: dict[str, str]) -> None:
    if keys:
        rows = (json.dumps({"key": k, "survivor": survivor_of.get(k)}) + "\n" for k in keys)
        write_text(join(out, "dropped", f"{name}.jsonl"), "".join(rows))


# ---- CLI ------------------------------------------------------------------------------------------------------------


def summary_table(counts: dict[str, Any]) -> str:
    """The end-of-run table: every document accounted for, plus bytes and tokens."""
    rows = [("read", counts["read"])]
    rows += [(f"dropped: {k}", v) for k, v in counts["dropped"].items()]
    rows += [("exact duplicates", counts["exact_duplicates"]), ("near duplicates", counts["near_duplicates"])]
    rows += [(f"malformed: {k}", v) for k, v in counts["malformed"].items()]
    rows += [("kept", counts["kept"])]
    width = max(len(r[0]) for r in rows) + 2
    lines = [f"{'documents':{width}s}{'count':>10s}"] + [f"{k:{width}s}{v:>10d}" for k, v in rows]
    b = counts["bytes"]
    lines.append(f"bytes read {b['read']:,}, kept {b['kept']:,} (input bytes); cut {counts['cut']}, "
                 f"PII redactions {counts['pii_redactions']}")
    lines.append(f"tokens train {counts['tokens'][TRAIN]:,} val {counts['tokens'][VAL]:,}; blocks train "
                 f"{counts['train_blocks']:,} val {counts['val_blocks']:,}; n_vocab {counts['n_vocab']}")
    return "\n".join(lines)

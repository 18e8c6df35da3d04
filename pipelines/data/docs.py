"""The data stage's per-document processor: decode -> normalise -> quality rules -> PII -> content hash + MinHash,
one ``DOC_SCHEMA`` row per document (kept, dropped by a rule, or malformed). Plain code; ``process_files`` is the
Ray Data ``map_batches`` UDF that wraps it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from pipelines.data.dedup import content_hash, permutations, shingle_hashes, signature
from pipelines.data.inputs import RECORD_EXT, split_documents
from pipelines.data.text import code_filter, normalise, prose_filter, redact_pii

if TYPE_CHECKING:
    from pipelines.data.config import DataConfig

KEPT, DROPPED, MALFORMED = "kept", "dropped", "malformed"

DOC_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("status", pa.string()),
        ("reason", pa.string()),
        ("profile", pa.string()),
        ("n_bytes_in", pa.int64()),
        ("n_bytes", pa.int64()),
        ("cut", pa.bool_()),
        ("pii", pa.int32()),
        ("text", pa.string()),
        ("sample", pa.string()),
        ("hash", pa.int64()),
        ("sig", pa.list_(pa.uint32())),
    ]
)


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


def _row(key: str, status: str, reason: str, profile: str = "", n_bytes_in: int = 0) -> dict[str, Any]:
    return dict(
        key=key,
        status=status,
        reason=reason,
        profile=profile,
        n_bytes_in=n_bytes_in,
        n_bytes=0,
        cut=False,
        pii=0,
        text=None,
        sample=None,
        hash=0,
        sig=[],
    )


class DocProcessor:
    """One document through decode -> normalise -> quality rules -> PII -> hash + MinHash; a ``DOC_SCHEMA`` row."""

    def __init__(self, cfg: "DataConfig") -> None:
        self.cfg = cfg
        self.code_ext = tuple(e.lower() for e in cfg.code_extensions)
        self.perms = permutations(cfg.minhash.num_perm, cfg.minhash.seed)

    def profile_for(self, path: str) -> str:
        """``code`` for source files (``code_extensions``), ``prose`` for everything else, records included."""
        low = path.lower()
        if low.endswith(RECORD_EXT):
            return "prose"
        return "code" if low.endswith(self.code_ext) else "prose"

    def __call__(self, key: str, raw: bytes | str | None, bad: str, profile: str) -> dict[str, Any]:
        cfg = self.cfg
        n_in = len(raw.encode("utf-8", errors="surrogatepass")) if isinstance(raw, str) else len(raw or b"")
        row = _row(key, MALFORMED, bad, profile, n_in)
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
        row.update(
            status=KEPT,
            text=text,
            n_bytes=len(text.encode("utf-8", errors="surrogatepass")),
            hash=content_hash(text),
            sig=np.asarray(sig, dtype=np.uint32).tolist(),
        )
        return row


def process_files(batch: pa.Table, cfg: "DataConfig") -> pa.Table:
    """Ray Data UDF: a batch of files (``path``, ``bytes``) -> one ``DOC_SCHEMA`` row per document."""
    proc = DocProcessor(cfg)
    rows = []
    for path, data in zip(batch.column("path").to_pylist(), batch.column("bytes").to_pylist()):
        profile = proc.profile_for(path)
        for key, raw, bad in split_documents(path, data, cfg.text_field):
            rows.append(proc(key, raw, bad, profile))
    return pa.Table.from_pylist(rows, schema=DOC_SCHEMA)


def unreadable_rows(files: list[tuple[str, str]]) -> pa.Table:
    """One malformed row per file that could not be read at all."""
    return pa.Table.from_pylist([_row(f"{p}#{0:08d}", MALFORMED, why) for p, why in files], schema=DOC_SCHEMA)

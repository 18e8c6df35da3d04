"""The data stage's accounting: every document read is kept, dropped by a named rule, a duplicate or malformed; the
counts, input bytes, samples per rule and the end-of-run table. Plain functions over the materialized documents'
Arrow blocks (any iterable of ``DOC_SCHEMA`` tables)."""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from typing import Any, Iterable

import pyarrow as pa

from pipelines.artifacts import join, write_text
from pipelines.blocks import TRAIN, VAL
from pipelines.data.docs import DROPPED, KEPT

SLIM = ["key", "status", "reason", "profile", "n_bytes_in", "n_bytes", "cut", "pii", "sample"]


def account(blocks: Iterable[pa.Table], samples_per_rule: int, max_listed_malformed: int) -> dict[str, Any]:
    """One pass over the slim columns: counts and input bytes per status/reason, samples, malformed list."""
    read = kept = cut = pii = kept_text = 0
    dropped: Counter[str] = Counter()
    malformed: Counter[str] = Counter()
    profiles: Counter[str] = Counter()
    byts: Counter[str] = Counter()
    samples: dict[str, list[dict]] = defaultdict(list)
    malformed_list: list[dict[str, str]] = []
    for b in blocks:
        d = b.select(SLIM).to_pydict()
        for key, st, why, prof, n_in, n_out, c, p, smp in zip(*(d[c] for c in SLIM)):
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
                if len(samples[why]) < samples_per_rule:
                    samples[why].append({"key": key, "sample": smp})
            else:
                malformed[why.split(":", 1)[0]] += 1
                byts["malformed"] += n_in
                if len(malformed_list) < max_listed_malformed:
                    malformed_list.append({"source": key.rsplit("#", 1)[0], "key": key, "reason": why})
    return {
        "read": read,
        "kept_pre_dedup": kept,
        "dropped": dropped,
        "malformed": malformed,
        "cut": cut,
        "pii": pii,
        "profiles": dict(profiles),
        "bytes": dict(byts) | {k: byts.get(k, 0) for k in ("dropped", "malformed", "kept_pre_dedup")},
        "kept_text_bytes": kept_text,
        "samples": samples,
        "malformed_list": malformed_list,
    }


def dup_bytes(blocks: Iterable[pa.Table], exact: set[str], near: set[str]) -> tuple[dict[str, int], int]:
    """({"exact": input bytes, "near": input bytes}, normalised text bytes) of the removed duplicates."""
    out = {"exact": 0, "near": 0}
    text = 0
    if not exact and not near:
        return out, 0
    for b in blocks:
        for key, n_in, n_out in zip(*(b.column(c).to_pylist() for c in ("key", "n_bytes_in", "n_bytes"))):
            which = "exact" if key in exact else "near" if key in near else None
            if which:
                out[which] += n_in
                text += n_out
    return out, text


def write_samples(out: str, samples: dict[str, list[dict]]) -> None:
    """``dropped/<rule>.jsonl``: what each quality rule removed, for inspection."""
    for rule, rows in sorted(samples.items()):
        write_text(join(out, "dropped", f"{rule}.jsonl"), "".join(json.dumps(r) + "\n" for r in rows))


def write_dup_samples(out: str, name: str, keys: list[str], survivor_of: dict[str, str]) -> None:
    """``dropped/<name>.jsonl``: removed duplicates with the document that survived in their place."""
    if keys:
        rows = (json.dumps({"key": k, "survivor": survivor_of.get(k)}) + "\n" for k in keys)
        write_text(join(out, "dropped", f"{name}.jsonl"), "".join(rows))


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
    lines.append(
        f"bytes read {b['read']:,}, kept {b['kept']:,} (input bytes); cut {counts['cut']}, "
        f"PII redactions {counts['pii_redactions']}"
    )
    lines.append(
        f"tokens train {counts['tokens'][TRAIN]:,} val {counts['tokens'][VAL]:,}; blocks train "
        f"{counts['train_blocks']:,} val {counts['val_blocks']:,}; n_vocab {counts['n_vocab']}"
    )
    return "\n".join(lines)

"""SFT rows: JSONL conversations -> (ids, answer mask) with the checkpoint's chat template -> training positions ->
rows of ``seq_len`` (packed or padded). Plain functions; ``pipelines.sft.stage`` runs them, tests call them directly.

A sample of ``n`` tokens gives ``n - 1`` positions with ``labels[t] = ids[t+1]`` where ``mask[t+1]`` (else ``IGNORE``),
so labels are already aligned with the inputs.

- packed: several samples per row (first-fit by decreasing length); ``position_ids`` restart at 0 per sample and
  ``doc_ids`` (sample index within the row, -1 on the padded tail) keep attention inside a sample;
- padded: one sample per row, right-padded with the pad token (labels ``IGNORE``); causal attention as in pretraining.

Bad lines (not JSON, missing fields, unknown roles, non-string content, no assistant turn) are counted and skipped.
A sample longer than ``seq_len + 1`` tokens is cut to its first ``seq_len + 1`` tokens (``overlong=cut``) or dropped
(``overlong=drop``); a cut sample with no answer token left is dropped. All counted.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np

from models.chat import ChatError, ChatFormat, Message, encode_chat
from pipelines.train.loop import IGNORE

log = logging.getLogger(__name__)


# ---- samples: ids + aligned labels ---------------------------------------------------------------------------------


@dataclass
class Sample:
    """One conversation as training positions: ``input_ids[t]`` predicts ``labels[t]`` (-100 = no loss)."""

    input_ids: list[int]
    labels: list[int]


def to_sample(ids: Sequence[int], mask: Sequence[int], seq_len: int, overlong: str, counts: Counter) -> Sample | None:
    """Shift (ids, mask) into (input_ids, labels) of at most ``seq_len`` positions; None if dropped (counted)."""
    if len(ids) > seq_len + 1:
        if overlong == "drop":
            counts["dropped_overlong"] += 1
            return None
        ids, mask = ids[: seq_len + 1], mask[: seq_len + 1]
        counts["cut_overlong"] += 1
    labels = [t if m else IGNORE for t, m in zip(ids[1:], mask[1:])]
    if all(l == IGNORE for l in labels):
        counts["dropped_no_target"] += 1
        return None
    return Sample(list(ids[:-1]), labels)


def encode_samples(
    convs: Iterable[Sequence[Message]],
    tok: Any,
    fmt: ChatFormat,
    seq_len: int,
    train_on: str,
    overlong: str,
    counts: Counter,
) -> list[Sample]:
    out = []
    for msgs in convs:
        try:
            ids, mask = encode_chat(tok, fmt, msgs, train_on)
        except ChatError as e:
            counts["bad_template"] += 1
            log.warning("conversation skipped: %s", e)
            continue
        s = to_sample(ids, mask, seq_len, overlong, counts)
        if s is not None:
            out.append(s)
    counts["samples"] += len(out)
    return out


# ---- rows: packing vs padding --------------------------------------------------------------------------------------


def pack_bins(lengths: Sequence[int], capacity: int, window: int = 64) -> list[list[int]]:
    """Sample indices grouped into rows of at most ``capacity`` positions: first-fit by decreasing length, looking
    back over the last ``window`` open rows (O(n * window))."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    bins: list[list[int]] = []
    space: list[int] = []
    for i in order:
        n = lengths[i]
        for b in range(max(0, len(bins) - window), len(bins)):
            if space[b] >= n:
                bins[b].append(i)
                space[b] -= n
                break
        else:
            bins.append([i])
            space.append(capacity - n)
    return bins


def packed_rows(samples: Sequence[Sample], seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """(R, seq_len) arrays ``input_ids``, ``labels``, ``position_ids``, ``doc_ids`` with several samples per row."""
    bins = pack_bins([len(s.input_ids) for s in samples], seq_len)
    R = len(bins)
    ids = np.full((R, seq_len), pad_id, np.int64)
    labels = np.full((R, seq_len), IGNORE, np.int64)
    pos = np.zeros((R, seq_len), np.int64)
    doc = np.full((R, seq_len), -1, np.int64)
    for r, members in enumerate(bins):
        at = 0
        for d, i in enumerate(members):
            n = len(samples[i].input_ids)
            ids[r, at : at + n] = samples[i].input_ids
            labels[r, at : at + n] = samples[i].labels
            pos[r, at : at + n] = np.arange(n)
            doc[r, at : at + n] = d
            at += n
        pos[r, at:] = np.arange(seq_len - at)  # padded tail: its own "document" (-1), never in the loss
    return {"input_ids": ids, "labels": labels, "position_ids": pos, "doc_ids": doc}


def padded_rows(samples: Sequence[Sample], seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """(N, seq_len) arrays ``input_ids``, ``labels``: one sample per row, right-padded."""
    N = len(samples)
    ids = np.full((N, seq_len), pad_id, np.int64)
    labels = np.full((N, seq_len), IGNORE, np.int64)
    for r, s in enumerate(samples):
        n = len(s.input_ids)
        ids[r, :n] = s.input_ids
        labels[r, :n] = s.labels
    return {"input_ids": ids, "labels": labels}


def make_rows(samples: Sequence[Sample], seq_len: int, pad_id: int, pack: bool) -> dict[str, np.ndarray]:
    return packed_rows(samples, seq_len, pad_id) if pack else padded_rows(samples, seq_len, pad_id)


def fill_ratio(rows: dict[str, np.ndarray], samples: Sequence[Sample]) -> float:
    """Share of row positions holding a real token (1 - wasted-position share)."""
    return sum(len(s.input_ids) for s in samples) / max(rows["input_ids"].size, 1)


def cap_rows(rows: dict[str, np.ndarray], n: int) -> dict[str, np.ndarray]:
    """The first ``n`` rows (all when ``n`` <= 0)."""
    return {k: v[:n] for k, v in rows.items()} if n > 0 else rows

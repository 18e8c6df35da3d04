"""A noisy curve's two ends, with their spread: the mean and standard deviation of its first and last ``k`` points,
so a report never reads a gain off two single endpoints. Shared by the stages' summaries and the demo's."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence


@dataclass
class CurveEnds:
    """The first and the last ``k`` points of a curve: where they are, their mean and standard deviation."""

    k: int
    first_at: tuple[Any, Any]  # (x of the first point, x of the k-th)
    last_at: tuple[Any, Any]
    first: tuple[float, float]  # (mean, sample standard deviation; 0 for one point)
    last: tuple[float, float]


def curve_ends(rows: Sequence[dict[str, Any]], key: str, x: str = "step", k: int | None = None) -> CurveEnds | None:
    """Mean +- standard deviation of ``key`` over the first and the last ``k`` rows that have it (default: up to 5,
    a third of the points, never overlapping); None with fewer than two points."""
    pts = [
        (r.get(x), float(r[key]))
        for r in rows
        if isinstance(r.get(key), (int, float)) and not math.isnan(float(r[key]))
    ]
    n = len(pts)
    if n < 2:
        return None
    if k is None:
        k = min(5, n // 3) if n >= 6 else n // 2
    k = max(1, min(k, n // 2))
    head, tail = pts[:k], pts[-k:]
    return CurveEnds(
        k,
        (head[0][0], head[-1][0]),
        (tail[0][0], tail[-1][0]),
        mean_sd([v for _, v in head]),
        mean_sd([v for _, v in tail]),
    )


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """(mean, sample standard deviation; 0 for one value)."""
    m = sum(values) / len(values)
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return m, sd

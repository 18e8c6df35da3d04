"""What ``genloop rlhf`` writes besides the model: per-iteration metrics and the reward curve."""

from __future__ import annotations

import io
from typing import Any, Sequence

from pipelines.artifacts import join, write_bytes
from pipelines.train.metrics import write_metrics


def write_history(out: str, rows: Sequence[dict[str, Any]]) -> None:
    """``metrics.jsonl``, ``metrics.csv`` and ``reward_curve.png`` (rewritten whole each iteration)."""
    write_metrics(out, rows)
    plot_rewards(out, rows)


def plot_rewards(out: str, rows: Sequence[dict[str, Any]]) -> str | None:
    """``<out>/reward_curve.png``: mean reward per iteration (+- std band), each reward part, and KL on a second
    axis."""
    pts = [r for r in rows if "reward_mean" in r]
    if not pts:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [r["iteration"] for r in pts]
    mean = [r["reward_mean"] for r in pts]
    std = [r.get("reward_std", 0.0) for r in pts]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    ax.plot(x, mean, "o-", label="reward (mean)")
    ax.fill_between(x, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], alpha=0.2)
    parts = sorted({k for r in pts for k in r if k.startswith("reward/")})
    if len(parts) > 1:
        for k in parts:
            ax.plot(x, [r.get(k, float("nan")) for r in pts], "--", label=k)
    ax.set_xlabel("iteration")
    ax.set_ylabel("reward")
    ax.grid(alpha=0.3)
    if any("kl" in r for r in pts):
        ax2 = ax.twinx()
        ax2.plot(x, [r.get("kl", float("nan")) for r in pts], ":", color="gray", label="KL to reference")
        ax2.set_ylabel("KL (k3, per token)")
    ax.legend(loc="best", fontsize=8)
    ax.set_title("RLHF reward")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    plt.close(fig)
    path = join(out, "reward_curve.png")
    write_bytes(path, buf.getvalue())
    return path

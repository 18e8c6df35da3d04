"""Training metrics: peak FLOP/s per device (for MFU), and the artifact's metrics.jsonl / metrics.csv / loss_curve.png.

Public writers for every stage: ``write_metrics(out, rows)`` (jsonl + csv), ``plot_loss(out, rows)``,
``plot_curves(out, rows, {label: key}, filename)`` (any metric over ``step``), ``mfu``, ``device_peak_flops``.

MFU = achieved model FLOP/s / peak FLOP/s, with model FLOPs per token from ``ModelConfig.flops_per_token`` (6N plus
attention). GPU peaks are dense bf16 tensor-core figures from the vendors' data sheets; a CPU has no data sheet
figure we can trust, so its peak is *measured* once (a float32 matmul on the threads a worker uses) and cached in
``~/.cache/genloop/cpu_flops.json``.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from pipelines.artifacts import join, write_text

log = logging.getLogger(__name__)

# dense bf16 peak FLOP/s (no sparsity), by a substring of torch.cuda.get_device_name()
GPU_PEAK_FLOPS: dict[str, float] = {
    "H200": 989e12,
    "H100": 989e12,  # SXM; the PCIe card is 756e12 (matched first below)
    "A100": 312e12,
}
H100_PCIE_PEAK = 756e12

CACHE = Path(os.environ.get("GENLOOP_CACHE", Path.home() / ".cache" / "genloop")) / "cpu_flops.json"


def gpu_peak_flops(name: str) -> float | None:
    """Peak bf16 FLOP/s for a CUDA device name (``NVIDIA H100 80GB HBM3``), None if not in the table."""
    if "H100" in name and "PCIe" in name:
        return H100_PCIE_PEAK
    for key, flops in GPU_PEAK_FLOPS.items():
        if key in name:
            return flops
    return None


def measure_cpu_flops(threads: int, n: int = 1024, repeats: int = 5) -> float:
    """FLOP/s of an (n x n) @ (n x n) float32 matmul on ``threads`` threads (best of ``repeats``)."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b = torch.randn(n, n), torch.randn(n, n)
        a @ b  # warm-up
        best = math.inf
        for _ in range(repeats):
            t0 = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - t0)
    finally:
        torch.set_num_threads(old)
    return 2 * n**3 / best


def cpu_peak_flops(threads: int) -> float:
    """Measured CPU matmul FLOP/s for ``threads`` threads, cached per host and thread count."""
    key = f"{os.uname().nodename}:{threads}"
    try:
        cache = json.loads(CACHE.read_text())
    except (OSError, json.JSONDecodeError):
        cache = {}
    if key not in cache:
        cache[key] = measure_cpu_flops(threads)
        try:
            CACHE.parent.mkdir(parents=True, exist_ok=True)
            CACHE.write_text(json.dumps(cache, indent=2))
        except OSError:  # a read-only home: measure again next time
            pass
    return float(cache[key])


def device_peak_flops(device: torch.device) -> float | None:
    if device.type == "cuda":
        return gpu_peak_flops(torch.cuda.get_device_name(device))
    return cpu_peak_flops(torch.get_num_threads())


def mfu(tokens_per_s: float, flops_per_token: float, peak_flops: float | None) -> float:
    """Model FLOPs utilisation of one device (pass per-device tokens/s), 0 when the peak is unknown."""
    return tokens_per_s * flops_per_token / peak_flops if peak_flops else 0.0


# ---- artifact files ------------------------------------------------------------------------------------------------
def to_jsonl(rows: Sequence[dict[str, Any]]) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def to_csv(rows: Sequence[dict[str, Any]]) -> str:
    """All rows under the union of their keys (first-seen order); missing cells empty."""
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def write_metrics(out: str, rows: Sequence[dict[str, Any]]) -> None:
    """``<out>/metrics.jsonl`` and ``<out>/metrics.csv`` (rewritten whole: the history is small)."""
    write_text(join(out, "metrics.jsonl"), to_jsonl(rows))
    write_text(join(out, "metrics.csv"), to_csv(rows))


def plot_loss(out: str, rows: Sequence[dict[str, Any]], title: str = "loss",
              ylabel: str = "cross-entropy (nats/token)") -> str | None:
    """``<out>/loss_curve.png``: train loss per logged step, val loss where evaluated."""
    return plot_curves(out, rows, {"train": "loss", "val": "val_loss"}, "loss_curve.png", ylabel=ylabel, title=title)


def plot_curves(out: str, rows: Sequence[dict[str, Any]], series: dict[str, str], filename: str,
                ylabel: str = "", title: str = "") -> str | None:
    """``<out>/<filename>``: one line per ``{label: metric key}`` over ``step`` (rows lacking the key are skipped;
    a series with few points is drawn with markers). None when no row has any of the keys. Other stages use it
    for their own curves (``reward_curve.png``...)."""
    lines = {label: [(r["step"], r[key]) for r in rows if key in r and "step" in r] for label, key in series.items()}
    lines = {label: pts for label, pts in lines.items() if pts}
    if not lines:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for label, pts in lines.items():
        ax.plot(*zip(*pts), "o-" if len(pts) < 12 else "-", label=label)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    plt.close(fig)
    path = join(out, filename)
    from pipelines.artifacts import filesystem

    fs, p = filesystem(path)
    fs.create_dir(p.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(p) as f:
        f.write(buf.getvalue())
    return path

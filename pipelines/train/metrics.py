"""Training metrics: peak FLOP/s per device (for MFU), and the artifact's metrics.jsonl / metrics.csv / loss_curve.png.

Public writers for every stage: ``write_metrics(out, rows)`` (jsonl + csv), ``plot_loss(out, rows)``,
``plot_curves(out, rows, {label: key}, filename)`` (any metric over ``step``), ``mfu``, ``model_flops_per_token``,
``device_peak_flops``; and the one GPU table, ``GPUS`` (``GpuSpec``: peak, memory, source, device-name pattern),
``gpu_key_for_device``, that ``genloop plan`` (pipelines/pretrain/plan.py) reads too.

MFU = achieved model FLOP/s / peak FLOP/s, with model FLOPs per token from ``ModelConfig.flops_per_token`` (6 x the
matmul weights, output projection included, plus the attention scores), the same count ``genloop plan`` uses. GPU
peaks are dense bf16 tensor-core figures from the vendors' data sheets; a CPU has no data sheet figure we can
trust, so its peak is *measured* once (a float32 matmul on the threads a worker uses) and cached in
``~/.cache/genloop/cpu_flops.json``.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from pipelines.artifacts import join, write_text

log = logging.getLogger(__name__)

GB = 1e9  # decimal gigabytes, as GPU data sheets print them


@dataclass(frozen=True)
class GpuSpec:
    """One GPU model: what MFU divides by and what ``genloop plan`` sizes a run with."""

    name: str
    peak_flops: float  # dense bf16 tensor-core FLOP/s (no sparsity); a CPU's is a measured fp32 matmul
    memory_bytes: float  # device memory (decimal bytes, as on the data sheet)
    source: str  # where the numbers come from
    device_pattern: str = ""  # regex (case-insensitive) over torch.cuda.get_device_name() / Ray's accelerator_type


# The one GPU table (``genloop plan --gpu KEY`` and the training loop's MFU). Dense bf16 = half the data sheets'
# "with sparsity" figure (their footnote: "specifications are one-half lower without sparsity"). Memory as printed on
# the data sheet (decimal GB). The device patterns are mutually exclusive (tests/test_metrics.py checks each row
# against real device names): a variant (PCIe, NVL, 40GB) never falls through to its base row's peak.
GPUS: dict[str, GpuSpec] = {
    # NVIDIA H100 Tensor Core GPU data sheet, H100 SXM column: BF16 1,979 TFLOPS with sparsity, 80 GB HBM3
    # (device name "NVIDIA H100 80GB HBM3")
    "h100": GpuSpec(
        "NVIDIA H100 SXM5 80GB", 989.5e12, 80 * GB, "NVIDIA H100 data sheet (SXM)", r"\bH100\b(?!.*\b(PCIe|NVL)\b)"
    ),
    # same data sheet, H100 PCIe column: BF16 1,513 TFLOPS with sparsity, 80 GB HBM2e ("NVIDIA H100 PCIe")
    "h100-pcie": GpuSpec(
        "NVIDIA H100 PCIe 80GB", 756.5e12, 80 * GB, "NVIDIA H100 data sheet (PCIe)", r"\bH100\b.*\bPCIe\b"
    ),
    # same data sheet, H100 NVL column: BF16 1,671 TFLOPS with sparsity, 94 GB HBM3 per GPU ("NVIDIA H100 NVL")
    "h100-nvl": GpuSpec(
        "NVIDIA H100 NVL 94GB", 835.5e12, 94 * GB, "NVIDIA H100 data sheet (NVL)", r"\bH100\b.*\bNVL\b"
    ),
    # NVIDIA H200 Tensor Core GPU data sheet, H200 SXM column: BF16 1,979 TFLOPS with sparsity, 141 GB HBM3e
    # ("NVIDIA H200")
    "h200": GpuSpec(
        "NVIDIA H200 SXM 141GB", 989.5e12, 141 * GB, "NVIDIA H200 data sheet (SXM)", r"\bH200\b(?!.*\bNVL\b)"
    ),
    # same data sheet, H200 NVL column: BF16 1,671 TFLOPS with sparsity, 141 GB HBM3e ("NVIDIA H200 NVL")
    "h200-nvl": GpuSpec(
        "NVIDIA H200 NVL 141GB", 835.5e12, 141 * GB, "NVIDIA H200 data sheet (NVL)", r"\bH200\b.*\bNVL\b"
    ),
    # NVIDIA A100 Tensor Core GPU data sheet: BF16 312 TFLOPS dense (624 with sparsity), SXM and PCIe alike;
    # 80 GB HBM2e ("NVIDIA A100-SXM4-80GB", "NVIDIA A100 80GB PCIe") or 40 GB HBM2 ("NVIDIA A100-SXM4-40GB",
    # "NVIDIA A100-PCIE-40GB"; Ray's label A100-40G)
    "a100": GpuSpec("NVIDIA A100 80GB", 312e12, 80 * GB, "NVIDIA A100 data sheet (80GB)", r"\bA100\b(?!.*\b40GB?\b)"),
    "a100-40gb": GpuSpec("NVIDIA A100 40GB", 312e12, 40 * GB, "NVIDIA A100 data sheet (40GB)", r"\bA100\b.*\b40GB?\b"),
    # NVIDIA L4 Tensor Core GPU data sheet: BF16 242 TFLOPS with sparsity, 24 GB GDDR6 ("NVIDIA L4"; the word
    # boundary keeps the L40 / L40S out)
    "l4": GpuSpec("NVIDIA L4 24GB", 121e12, 24 * GB, "NVIDIA L4 data sheet", r"\bL4\b"),
    # NVIDIA HGX B200 specifications (8 GPUs): FP16/BF16 36 PFLOPS with sparsity, 1,440 GB HBM3e in all, i.e.
    # 4.5 PFLOPS sparse / 2.25 dense and 180 GB per GPU ("NVIDIA B200"; a GB200's B200 runs faster and is not this row)
    "b200": GpuSpec("NVIDIA B200 180GB", 2.25e15, 180 * GB, "NVIDIA HGX B200 specifications, per GPU", r"\bB200\b"),
}

CACHE = Path(os.environ.get("GENLOOP_CACHE", Path.home() / ".cache" / "genloop")) / "cpu_flops.json"


def gpu_key_for_device(device_name: str) -> str | None:
    """The ``GPUS`` key for a ``torch.cuda.get_device_name()`` string (``NVIDIA H100 80GB HBM3``) or a Ray
    ``accelerator_type`` (``H100``), None if no row matches."""
    for key, spec in GPUS.items():
        if re.search(spec.device_pattern, device_name, re.IGNORECASE):
            return key
    return None


def gpu_peak_flops(name: str) -> float | None:
    """Dense bf16 peak FLOP/s for a CUDA device name (``NVIDIA H100 80GB HBM3``), None if not in ``GPUS``."""
    key = gpu_key_for_device(name)
    return GPUS[key].peak_flops if key else None


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


def model_flops_per_token(model: torch.nn.Module, seq_len: int) -> float:
    """Training FLOPs per token of a genloop model: ``ModelConfig.flops_per_token`` (the count ``genloop plan``
    uses) with the model's own output head, the LM head's ``vocab_size`` columns or a scalar model's 1-wide
    ``score``; 0 for a model without a ``cfg`` (MFU then reads 0)."""
    cfg = getattr(model, "cfg", None)
    if cfg is None or not hasattr(cfg, "flops_per_token"):
        return 0.0
    if hasattr(model, "lm_head"):
        return float(cfg.flops_per_token(seq_len))
    score = getattr(model, "score", None)
    return float(cfg.flops_per_token(seq_len, head_out=score.out_features if isinstance(score, torch.nn.Linear) else 0))


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


def plot_loss(
    out: str, rows: Sequence[dict[str, Any]], title: str = "loss", ylabel: str = "cross-entropy (nats/token)"
) -> str | None:
    """``<out>/loss_curve.png``: train loss per logged step, val loss where evaluated."""
    return plot_curves(out, rows, {"train": "loss", "val": "val_loss"}, "loss_curve.png", ylabel=ylabel, title=title)


def plot_curves(
    out: str, rows: Sequence[dict[str, Any]], series: dict[str, str], filename: str, ylabel: str = "", title: str = ""
) -> str | None:
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

"""What a stage asks of the Ray runtime it was handed (the command layer starts Ray; stages never do)."""

from __future__ import annotations


def use_gpu_default() -> bool:
    """True when the connected Ray cluster has GPUs: stages then place workers on them unless told otherwise."""
    import ray

    if not ray.is_initialized():
        return False
    try:
        return float(ray.cluster_resources().get("GPU", 0)) > 0
    except Exception:  # the cluster went away between the check and the call
        return False

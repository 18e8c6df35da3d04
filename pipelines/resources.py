"""What each stage asks Ray for, per unit of work: the table the autoscaler's choice of node type follows from.

Ray's autoscaler adds nodes from the *shape* of pending resource requests. Declaring each stage's ask in one place
keeps stages, the cloud cluster (``ray-cluster.yaml``) and the local autoscaling proof (``cluster/autoscale.py``)
consistent: data tasks ask for CPUs only, so they land on ``cpu-worker`` nodes (the head advertises no CPUs); every
training worker, rollout engine and serving replica asks for one GPU, so GPU worker types are added for them.

On a machine without GPUs, ``ray_options(unit, use_gpu=False)`` drops the GPU ask and keeps the CPUs, so the same
stage code runs on a laptop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class ResourceAsk:
    """Resources one unit of a stage's work holds while it runs."""

    stage: str  # the genloop stage that issues it
    unit: str  # what one ask is for (one Ray task / actor / train worker / replica)
    cpus: float
    gpus: float = 0.0
    node_type: str = "cpu-worker"  # the ray-cluster.yaml worker type that serves it on a cloud cluster


# unit name -> ask. Stages read these as defaults for their Ray options (Ray Data `num_cpus`, Ray Train
# ScalingConfig `resources_per_worker`, actor / deployment options).
ASKS: dict[str, ResourceAsk] = {
    "data_task": ResourceAsk("data", "one Ray Data map_batches task (clean, dedup, tokenize)", cpus=1),
    "train_worker": ResourceAsk(
        "pretrain", "one Ray Train worker (DDP/FSDP2 rank)", cpus=4, gpus=1, node_type="gpu-8x"
    ),
    "sft_worker": ResourceAsk("sft", "one Ray Train worker", cpus=4, gpus=1, node_type="gpu-1x"),
    "reward_worker": ResourceAsk("reward", "one Ray Train worker", cpus=4, gpus=1, node_type="gpu-1x"),
    "rollout_engine": ResourceAsk("rlhf", "one vLLM rollout actor", cpus=2, gpus=1, node_type="gpu-1x"),
    "learner_worker": ResourceAsk("rlhf", "one learner rank", cpus=4, gpus=1, node_type="gpu-8x"),
    "reward_scorer": ResourceAsk("rlhf", "one reward-model actor scoring rollouts", cpus=1, gpus=1, node_type="gpu-1x"),
    "serve_replica": ResourceAsk(
        "serve", "one Ray Serve generator replica (vLLM engine)", cpus=2, gpus=1, node_type="gpu-1x"
    ),
}


def ask(unit: str) -> ResourceAsk:
    if unit not in ASKS:
        raise ValueError(f"unknown resource unit {unit!r}; known: {', '.join(ASKS)} (pipelines/resources.py)")
    return ASKS[unit]


def ray_options(unit: str, use_gpu: bool = True) -> dict[str, float]:
    """``{"num_cpus": .., "num_gpus": ..}`` for ``.options(**...)`` of a task/actor; no GPU ask when ``use_gpu`` is
    False (a CPU-only cluster)."""
    a = ask(unit)
    return {"num_cpus": a.cpus, "num_gpus": a.gpus if use_gpu else 0.0}


def resources_per_worker(unit: str, use_gpu: bool = True) -> dict[str, float]:
    """The same ask in Ray Train's ``ScalingConfig(resources_per_worker=...)`` spelling."""
    o = ray_options(unit, use_gpu)
    return {"CPU": o["num_cpus"], **({"GPU": o["num_gpus"]} if o["num_gpus"] else {})}


def check_placement(what: str, parts: Sequence[tuple[str, int, float, float]], use_gpu: bool, advice: str) -> None:
    """Fail up front, with one line naming the shortfall and ``advice``, when the connected Ray cluster cannot hold
    ``parts`` at once (``(label, count, CPUs each, GPUs each)``; the GPU asks only count when ``use_gpu``): a job
    that asks for more than the cluster has would otherwise wait forever."""
    import ray

    res = ray.cluster_resources()
    asks = {"CPU": [(label, n, cpus) for label, n, cpus, _ in parts if n and cpus]}
    if use_gpu:
        asks["GPU"] = [(label, n, gpus) for label, n, _, gpus in parts if n and gpus]
    for kind, rows in asks.items():
        need, have = sum(n * each for _, n, each in rows), res.get(kind, 0)
        if have < need:
            detail = " + ".join(f"{n} {label} x {each:g}" for label, n, each in rows)
            tip = advice + (", or set train.use_gpu=false" if kind == "GPU" else "")
            raise ValueError(f"{what} needs {need:g} {kind}s but the Ray cluster has {have:g} ({detail}); {tip}")


def table() -> str:
    """The table as text (for ``genloop submit --help`` and the README)."""
    rows = [
        f"  {name:15s} {a.stage:9s} CPU {a.cpus:<4g} GPU {a.gpus:<3g} -> {a.node_type:10s} {a.unit}"
        for name, a in ASKS.items()
    ]
    return "\n".join(rows)

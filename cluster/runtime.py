"""Connecting to Ray: an existing cluster (``--address`` / ``RAY_ADDRESS``) or an embedded local Ray."""

from __future__ import annotations

import logging
import os

import ray

log = logging.getLogger(__name__)

# Environment every Ray worker of an embedded local Ray gets: quiet, CPU-only friendly, no telemetry.
LOCAL_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "TOKENIZERS_PARALLELISM": "false",
    "RAY_TRAIN_V2_ENABLED": "1",
}


# Loggers of Ray's own actors that make a local run loud, and the level each is raised to: Train V2's
# PlacementGroupCleaner asks the state API (served by the dashboard, which a local Ray here does not start) whether the
# controller lives, every second, and warns each time it cannot; Train's worker context logs every report() call
# (its logger is named by its file) and every checkpoint with all the metrics the stage already logs in one line.
QUIET_LOGGERS = {
    "ray.train.v2._internal.execution.controller.placement_group_cleaner": logging.ERROR,
    "ray.train.v2._internal.execution.storage": logging.WARNING,
    os.path.join(os.path.dirname(ray.__file__), "train", "v2", "_internal", "execution", "context.py"): logging.WARNING,
}


def quiet_ray_worker() -> None:
    """``worker_process_setup_hook`` of an embedded local Ray: runs once in every worker process."""
    for name, level in QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(level)


def init_ray(address: str | None = None, num_cpus: int | None = None, **kwargs) -> None:
    """Connect once per process. ``address`` (or ``RAY_ADDRESS``) joins a cluster; otherwise a local Ray starts."""
    if ray.is_initialized():
        return
    for k, v in LOCAL_ENV.items():
        os.environ.setdefault(k, v)
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        log.info("connecting to Ray at %s", address)
        ray.init(address=address, log_to_driver=True, **kwargs)
        return
    if num_cpus is None:
        # logical CPUs: a 2-core laptop still places a 2-worker trainer next to the driver's data tasks
        num_cpus = max(4, os.cpu_count() or 1)
    log.info("starting an embedded local Ray (num_cpus=%d)", num_cpus)
    ray.init(
        num_cpus=num_cpus,
        include_dashboard=False,
        logging_level=logging.WARNING,
        log_to_driver=True,
        runtime_env={"env_vars": LOCAL_ENV, "worker_process_setup_hook": "cluster.runtime.quiet_ray_worker"},
        **kwargs,
    )

"""``genloop autoscale-proof``: the autoscaling proof on a local multi-node Ray (the proof: ``cluster.autoscale``);
prints the worker-count timeline and the JSON report. Exit code 0 only if workers were added, ran the work and
were removed again."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import time
from typing import Any

log = logging.getLogger("cluster.autoscale")

HELP = "prove autoscaling on a local multi-node Ray: stage-shaped asks add workers, idle ones go"


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from cluster.autoscale import FAKE_CONFIG

    p = sub.add_parser(
        "autoscale-proof",
        help=HELP,
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--cluster-config", default=str(FAKE_CONFIG), help="fake multi-node cluster config (YAML)")
    p.add_argument("--data-tasks", type=int, default=2, help="units of the data stage's ask (cpu-worker)")
    p.add_argument("--gpu-units", type=int, default=1, help="units of the SFT worker's ask (gpu-1x)")
    p.add_argument("--work-s", type=float, default=3.0, help="seconds each unit works")
    p.add_argument("--idle-timeout-minutes", type=float, default=None)
    p.add_argument("--timeout-s", type=float, default=150)
    p.add_argument("--keep", action="store_true", help="keep the cluster's temp dir (logs) afterwards")
    return p


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def run(args: argparse.Namespace) -> int:
    from cluster.autoscale import (
        Demand,
        LocalRayCluster,
        load_fake_config,
        new_token,
        prove_autoscaling,
        worker_node_types,
    )

    cfg = load_fake_config(args.cluster_config, args.idle_timeout_minutes)
    # SIGTERM (a test's timeout) unwinds like Ctrl-C, so the cluster below is always stopped
    signal.signal(signal.SIGTERM, _interrupt)
    # this process becomes a driver of that cluster: its auth settings must be in place before Ray is imported
    token = new_token()
    os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
    cluster = LocalRayCluster(num_cpus=0, dashboard=False, autoscaling_config=cfg, token=token)
    t0 = time.monotonic()
    try:
        cluster.start()
        import ray

        ray.init(address=cluster.gcs_address, logging_level=logging.WARNING, log_to_driver=False)
        log.info(
            "head up in %.1fs; worker node types: %s",
            time.monotonic() - t0,
            {k: v["resources"] for k, v in worker_node_types(cfg).items()},
        )
        phases = [Demand("data_task", args.data_tasks), Demand("sft_worker", args.gpu_units)]
        report = prove_autoscaling(cfg, [d for d in phases if d.count], work_s=args.work_s, timeout_s=args.timeout_s)
        ray.shutdown()
    finally:
        cluster.stop()
        if not args.keep:
            cluster.cleanup()
        else:
            log.info("logs kept in %s", cluster.logs_dir())
    print("\n  t (s)   " + "  ".join(f"{k:>10s}" for k in worker_node_types(cfg)))
    for t, c in report["timeline"]:
        print(f"  {t:6.1f}  " + "  ".join(f"{c.get(k, 0):>10d}" for k in worker_node_types(cfg)))
    report["total_s"] = round(time.monotonic() - t0, 1)
    print(json.dumps(report))
    return 0 if report["scaled_up"] and report["work_on_workers"] and report["scaled_down"] else 1

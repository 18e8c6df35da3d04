"""A real multi-process Ray cluster on this machine: a head with the job server, optionally autoscaling.

``LocalRayCluster`` runs ``ray start --head`` in its own temp dir, on its own free ports, in its own process group,
with Ray token authentication on; ``stop()`` ends exactly that process group (never ``ray stop``, which would kill
every Ray on the machine, including a test session's embedded one).

With ``autoscaling_config`` it is the autoscaling simulation of ``ray.cluster_utils.AutoscalingCluster``: Ray's
fake multi-node provider starts each requested "VM" as one more raylet here. ``cluster/fake_multinode.yaml``
supplies the node types (those of ``ray-cluster.yaml`` at small size; the wheel lacks Ray's example config).

``genloop autoscale-proof`` is the autoscaling proof: from zero workers, stage-shaped resource asks
(``pipelines/resources.py``) make the autoscaler add worker nodes, the work runs on them, and the nodes are removed
after the idle timeout. It prints the node counts it saw over time and a JSON report as its last line.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

log = logging.getLogger(__name__)

FAKE_CONFIG = Path(__file__).with_name("fake_multinode.yaml")
HEAD_TYPE = "ray.head.default"
NODE_TYPE_LABEL = "genloop.io/node-type"
# The fake provider's fixed id for the head (autoscaler v2 matches the head by it).
FAKE_HEAD_NODE_ID = "fffffffffffffffffffffffffffffffffffffffffffffffffff00000"


def free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports that are free right now (bound together, then released)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def load_fake_config(path: str | Path = FAKE_CONFIG, idle_timeout_minutes: float | None = None) -> dict[str, Any]:
    """The fake multi-node cluster config (a dict, as the autoscaler reads it)."""
    cfg = yaml.safe_load(Path(path).read_text())
    if idle_timeout_minutes is not None:
        cfg["idle_timeout_minutes"] = idle_timeout_minutes
    return cfg


def worker_node_types(cfg: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {k: v for k, v in cfg["available_node_types"].items() if k != cfg["head_node_type"]}


def new_token() -> str:
    """A fresh random Ray auth token. A driver process must export it (``RAY_AUTH_MODE=token``,
    ``RAY_AUTH_TOKEN``) before its first ``import ray``: Ray reads the auth mode once per process."""
    return secrets.token_hex(24)


def _group_pids(pgid: int) -> list[int]:
    """Live (not zombie) PIDs whose process group is ``pgid`` (read from /proc/PID/stat)."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        # "pid (comm) state ppid pgrp ..." -- comm may contain spaces/parens: split after the last ")"
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            pids.append(int(d.name))
    return pids


def _pids_mentioning(text: str) -> list[int]:
    """PIDs whose command line contains ``text`` (this cluster's unique temp dir)."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            if text in (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                pids.append(int(d.name))
        except OSError:
            continue
    return pids


@dataclass
class LocalRayCluster:
    """A Ray head on this machine (own temp dir, ports, process group), optionally autoscaling (fake provider)."""

    num_cpus: int = 2
    num_gpus: int = 0
    dashboard: bool = True  # the job server runs in the dashboard
    autoscaling_config: dict[str, Any] | None = None
    token_auth: bool = True
    extra_env: dict[str, str] = field(default_factory=dict)
    temp_dir: str = ""
    gcs_port: int = 0
    dashboard_port: int = 0
    token: str = ""
    _pgid: int = 0

    # -- addresses -------------------------------------------------------------------------------------------------
    @property
    def node_ip(self) -> str:
        from ray._private.services import get_node_ip_address

        return get_node_ip_address()

    @property
    def gcs_address(self) -> str:
        return f"{self.node_ip}:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def client_env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """Environment for a client process (``genloop submit``, a driver) talking to this cluster."""
        env = dict(os.environ if base is None else base)
        for k in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN_PATH"):
            env.pop(k, None)
        if self.token_auth:
            env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=self.token)
        else:
            env["RAY_AUTH_MODE"] = "disabled"
        return env

    # -- lifecycle -------------------------------------------------------------------------------------------------
    def start(self, timeout_s: float = 180, attempts: int = 3) -> "LocalRayCluster":
        """Start the head; retried on a fresh temp dir and ports when `ray start` fails (on an overloaded machine
        Ray gives the raylet a fixed 30 s to register with the GCS)."""
        for attempt in range(1, attempts + 1):
            try:
                return self._start_once(timeout_s)
            except RuntimeError as e:
                self.cleanup()
                if attempt == attempts:
                    raise
                log.warning(
                    "local Ray head failed to start (attempt %d/%d), retrying: %s",
                    attempt,
                    attempts,
                    str(e).strip().splitlines()[-1],
                )
        raise AssertionError("unreachable")

    def _start_once(self, timeout_s: float) -> "LocalRayCluster":
        # a short path: Ray's unix sockets live under it and must stay under 108 bytes
        self.temp_dir = tempfile.mkdtemp(prefix="glr-", dir="/tmp")
        (
            self.gcs_port,
            self.dashboard_port,
            client_port,
            agent_listen,
            agent_grpc,
            runtime_env_port,
            metrics_port,
            node_manager_port,
            object_manager_port,
        ) = free_ports(9)
        if self.token_auth and not self.token:
            self.token = new_token()
        ray_exe = Path(sys.executable).with_name("ray")
        cmd = [
            str(ray_exe) if ray_exe.exists() else "ray",
            "start",
            "--head",
            "--disable-usage-stats",
            f"--port={self.gcs_port}",
            f"--temp-dir={self.temp_dir}",
            f"--num-cpus={self.num_cpus}",
            f"--num-gpus={self.num_gpus}",
            f"--include-dashboard={'true' if self.dashboard else 'false'}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={self.dashboard_port}",
            f"--ray-client-server-port={client_port}",
            f"--dashboard-agent-listen-port={agent_listen}",
            f"--dashboard-agent-grpc-port={agent_grpc}",
            f"--runtime-env-agent-port={runtime_env_port}",
            f"--metrics-export-port={metrics_port}",
            f"--node-manager-port={node_manager_port}",
            f"--object-manager-port={object_manager_port}",
            "--object-store-memory=200000000",
        ]
        env = self.client_env()
        # job drivers run `python -m cluster.cli ...`: this interpreter's venv comes first on PATH
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        env.update(self.extra_env)
        if self.autoscaling_config is not None:
            cfg = copy.deepcopy(self.autoscaling_config)
            head_resources = {"CPU": self.num_cpus, **({"GPU": self.num_gpus} if self.num_gpus else {})}
            cfg["available_node_types"][cfg["head_node_type"]]["resources"] = head_resources  # must match ray start
            # fake worker nodes join this head's GCS (the provider's default is port 6379, shared by every Ray here)
            cfg["provider"].update(gcs_address=self.gcs_address, launch_multiple=True, head_node_id=FAKE_HEAD_NODE_ID)
            cfg_path = Path(self.temp_dir) / "autoscaling_config.json"
            cfg_path.write_text(json.dumps(cfg))
            cmd.append(f"--autoscaling-config={cfg_path}")
            env.update(
                RAY_FAKE_CLUSTER="1",
                AUTOSCALER_UPDATE_INTERVAL_S="1",
                RAY_enable_autoscaler_v2="1",
                RAY_CLOUD_INSTANCE_ID=FAKE_HEAD_NODE_ID,
                RAY_OVERRIDE_NODE_ID_FOR_TESTING=FAKE_HEAD_NODE_ID,
                RAY_NODE_TYPE_NAME=cfg["head_node_type"],
            )
        start_log = Path(self.temp_dir) / "ray-start.log"
        log.info(
            "starting a local Ray head: GCS %s, dashboard %s, temp dir %s",
            self.gcs_port,
            self.dashboard_port,
            self.temp_dir,
        )
        with open(start_log, "w") as out:
            proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self._pgid = proc.pid  # every Ray process of this head inherits this process group
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            rc = -1
        if rc != 0:
            tail = start_log.read_text()[-3000:]
            self.stop()
            raise RuntimeError(f"`ray start --head` failed (rc={rc}):\n{tail}")
        if self.dashboard:
            self._wait_for_job_server(deadline=time.monotonic() + timeout_s)
        return self

    def _wait_for_job_server(self, deadline: float) -> None:
        import urllib.request

        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                req = urllib.request.Request(
                    f"{self.dashboard_url}/api/version",
                    headers={"Authorization": f"Bearer {self.token}"} if self.token else {},
                )
                with urllib.request.urlopen(req, timeout=5) as r:
                    if r.status == 200:
                        return
            except Exception as e:  # not up yet
                last = e
            time.sleep(1)
        self.stop()
        raise RuntimeError(f"the job server at {self.dashboard_url} did not come up: {last}")

    def stop(self, grace_s: float = 5) -> None:
        """End this cluster's processes only: its process group, then anything still naming its temp dir."""
        if self._pgid:
            try:
                os.killpg(self._pgid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            deadline = time.monotonic() + grace_s
            while _group_pids(self._pgid) and time.monotonic() < deadline:
                time.sleep(0.5)
            for pid in _group_pids(self._pgid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + grace_s
            while _group_pids(self._pgid) and time.monotonic() < deadline:
                time.sleep(0.2)
            self._pgid = 0
        if self.temp_dir:
            for pid in _pids_mentioning(self.temp_dir):  # e.g. a process that left the group (setsid)
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def cleanup(self) -> None:
        self.stop()
        if self.temp_dir:
            shutil.rmtree(self.temp_dir, ignore_errors=True)

    def logs_dir(self) -> Path:
        return Path(self.temp_dir) / "session_latest" / "logs"

    def __enter__(self) -> "LocalRayCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.cleanup()


# -- the autoscaling proof ---------------------------------------------------------------------------------------


def node_type_of(node: dict[str, Any], cfg: dict[str, Any]) -> str:
    """A live node's type: its genloop label, else the worker type whose GPU count matches, else the head."""
    labels = node.get("Labels") or {}
    if labels.get(NODE_TYPE_LABEL):
        return labels[NODE_TYPE_LABEL]
    res = node.get("Resources") or {}
    if any(k.startswith("node:__internal_head__") for k in res):
        return cfg["head_node_type"]
    gpus = res.get("GPU", 0)
    for name, t in worker_node_types(cfg).items():
        if t["resources"].get("GPU", 0) == gpus:
            return name
    return "unknown"


def worker_counts(cfg: dict[str, Any]) -> dict[str, int]:
    """Alive worker nodes per type (the head excluded), from ``ray.nodes()``."""
    import ray

    counts = {name: 0 for name in worker_node_types(cfg)}
    for n in ray.nodes():
        if n.get("Alive"):
            t = node_type_of(n, cfg)
            if t != cfg["head_node_type"]:
                counts[t] = counts.get(t, 0) + 1
    return counts


def _stage_unit(seconds: float) -> dict[str, Any]:
    """One unit of stage work: busy for ``seconds`` (a little real compute), reports where it ran."""
    import hashlib

    import ray

    t0, h = time.time(), b"genloop"
    while time.time() - t0 < seconds:
        for _ in range(2000):
            h = hashlib.sha256(h).digest()
    ctx = ray.get_runtime_context()
    return {"node_id": ctx.get_node_id(), "resources": ctx.get_assigned_resources()}


@dataclass
class Demand:
    """A stage-shaped demand: ``count`` units of ``pipelines.resources`` unit ``unit``."""

    unit: str
    count: int


def prove_autoscaling(
    cfg: dict[str, Any], phases: list[Demand], work_s: float = 3.0, timeout_s: float = 150, poll_s: float = 1.0
) -> dict[str, Any]:
    """Run each phase's demand in turn (like stages: data, then training) on the connected autoscaling cluster,
    recording worker counts over time, then wait until the autoscaler has scaled back to zero workers.

    Returns ``{"timeline": [[t, {type: n}], ...] (on change), "start", "peak": {type: max n},
    "ran_on": {unit: [node type per unit]}, "scaled_up", "work_on_workers", "scaled_down", "seconds"}``.
    """
    import ray

    from pipelines.resources import ray_options

    t0 = time.monotonic()
    timeline: list[tuple[float, dict[str, int]]] = []

    def sample() -> dict[str, int]:
        c = worker_counts(cfg)
        if not timeline or timeline[-1][1] != c:
            timeline.append((round(time.monotonic() - t0, 1), c))
            log.info("t=%5.1fs workers %s", timeline[-1][0], c)
        return c

    start_counts = sample()
    remote = ray.remote(_stage_unit)
    ran_on: dict[str, list[str]] = {}
    for phase in phases:
        log.info("phase %s: %d units asking %s", phase.unit, phase.count, ray_options(phase.unit))
        refs = [remote.options(**ray_options(phase.unit)).remote(work_s) for _ in range(phase.count)]
        pending = list(refs)
        while pending and time.monotonic() - t0 < timeout_s:
            _, pending = ray.wait(pending, num_returns=len(pending), timeout=poll_s)
            sample()
        if pending:
            raise TimeoutError(
                f"{len(pending)} of {len(refs)} {phase.unit} units did not finish in {timeout_s:.0f}s; "
                f"workers seen: {timeline}"
            )
        types_by_id = {n["NodeID"]: node_type_of(n, cfg) for n in ray.nodes()}
        ran_on[phase.unit] = [types_by_id.get(r["node_id"], "unknown") for r in ray.get(refs)]
    t_done = time.monotonic() - t0
    while time.monotonic() - t0 < timeout_s:
        if sum(sample().values()) == 0:
            break
        time.sleep(poll_s)
    workers = worker_node_types(cfg)
    peak = {k: max(c.get(k, 0) for _, c in timeline) for k in workers}
    return {
        "timeline": [[t, c] for t, c in timeline],
        "start": start_counts,
        "peak": peak,
        "ran_on": ran_on,
        "work_done_s": round(t_done, 1),
        "scaled_up": sum(start_counts.values()) == 0 and sum(peak.values()) > 0,
        "work_on_workers": all(t in workers for types in ran_on.values() for t in types),
        "scaled_down": sum(timeline[-1][1].values()) == 0,
        "seconds": round(time.monotonic() - t0, 1),
    }

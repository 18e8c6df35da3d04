"""`genloop serve` as a user runs it: its own local Ray, direct ingress on --port, the smoke questions answered."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from serve.app import DeploymentOptions, ServeConfig, direct_ingress_env, use_direct_ingress

ROOT = Path(__file__).resolve().parent.parent


def test_direct_ingress_only_where_it_can_work(monkeypatch):
    import ray

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    assert use_direct_ingress(ServeConfig(), None)
    assert not use_direct_ingress(ServeConfig(direct_ingress=False), None)
    assert not use_direct_ingress(ServeConfig(), "ray://head:10001")  # a cluster's controller is already running
    assert not use_direct_ingress(ServeConfig(ingress=DeploymentOptions(num_replicas=2)), None)  # one port each
    assert not use_direct_ingress(ServeConfig(ingress=DeploymentOptions(autoscaling={"max_replicas": 4})), None)
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    assert not use_direct_ingress(ServeConfig(), None)
    env = direct_ingress_env(8123)
    assert (env["RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"], env["RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT"]) == (
        "8123",
        "8124",
    )  # Ray's range excludes its upper bound: exactly one port


@pytest.mark.slow
def test_genloop_serve_smoke_answers_through_direct_ingress(tiny_checkpoint, tmp_path):
    from tests.helpers import free_port

    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS" and not k.startswith("RAY_SERVE_")}
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "cluster.cli",
            "serve",
            "--config",
            "tiny",
            "--model",
            str(tiny_checkpoint),
            "--knowledge",
            str(tmp_path / "state"),
            "--port",
            str(port),
            "--smoke",
            "2",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert f"at http://127.0.0.1:{port}/v1" in r.stdout
    assert "models: [('tiny', 'w-" in r.stdout  # name and model version (a bare checkpoint: weights hash)
    assert r.stdout.count("    answer: ") == 1 and r.stdout.count("    answer (streamed): ") == 1
    assert r.stdout.count("parses as a function: ") == 2 and "retrieval found: " in r.stdout
    # the feedback round: the non-streamed answer rated, recorded under the version that answered it
    m = re.search(r"feedback round: (\d+) ratings \((\d+) up, (\d+) down\) and (\d+) preferences", r.stdout)
    assert m and int(m.group(1)) == 1, r.stdout[-2000:]
    version = re.search(r"models: \[\('tiny', '([^']+)'\)\]", r.stdout).group(1)
    from serve.feedback import FeedbackStore

    out = FeedbackStore(str(tmp_path / "state" / "feedback.db")).export(
        str(tmp_path / "p.jsonl"), model_version=version
    )
    assert out["ratings"] == 1 and out["preferences"] == int(m.group(4))
    assert f"direct ingress: the ingress replica serves 127.0.0.1:{port}" in r.stderr

"""Autoscaling on one machine: Ray's fake multi-node provider, node types mirroring ray-cluster.yaml's.

From zero workers, the data stage's resource ask makes the autoscaler add a cpu-worker, an SFT worker's ask adds a
(logical) GPU node; the work runs on them; after the idle timeout the autoscaler removes them again."""

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_autoscaler_adds_workers_for_stage_demand_and_removes_them_when_idle():
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cluster.cli",
            "autoscale-proof",
            "--data-tasks",
            "2",
            "--gpu-units",
            "1",
            "--work-s",
            "2",
            "--timeout-s",
            "200",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        out, err = proc.communicate(timeout=330)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)  # the helper stops its cluster on SIGTERM
        out, err = proc.communicate(timeout=60)
        pytest.fail(f"autoscaling proof timed out:\n{out[-3000:]}\n{err[-3000:]}")
    print(out)  # the worker counts over time (shown with -s / -rP)
    assert proc.returncode == 0, out[-3000:] + err[-5000:]
    report = json.loads(out.strip().splitlines()[-1])
    assert report["start"] == {"cpu-worker": 0, "gpu-1x": 0, "gpu-8x": 0}
    assert report["scaled_up"] and report["peak"]["cpu-worker"] >= 1
    assert report["peak"]["gpu-1x"] + report["peak"]["gpu-8x"] >= 1
    assert report["ran_on"]["data_task"] == ["cpu-worker", "cpu-worker"], "data work ran on the added CPU node"
    assert report["ran_on"]["sft_worker"][0] in ("gpu-1x", "gpu-8x"), "the GPU ask ran on an added GPU node"
    assert report["scaled_down"] and report["timeline"][-1][1] == report["start"], "idle workers were removed"
    # the table of counts over time is printed before the report
    assert "cpu-worker      gpu-1x      gpu-8x" in out

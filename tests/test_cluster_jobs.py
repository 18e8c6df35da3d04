"""`genloop submit` / `genloop jobs` against a real local Ray head with the job server (its own temp dir, ports,
process group and auth token; stopped by the test without touching any other Ray on the machine)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cluster import jobs
from cluster.autoscale import LocalRayCluster, _group_pids
from tests.helpers import stdlib_texts

ROOT = Path(__file__).resolve().parent.parent


def genloop(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cluster.cli", *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT
    )


def no_cluster_env() -> dict:
    return {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}


# ---- checks that need no cluster --------------------------------------------------------------------------------


def test_submit_options_may_follow_the_stage_options():
    argv, own = jobs.split_submit_args(
        ["data", "--config", "tiny", "--address", "http://h:8265", "--no-wait", "seq_len=32"]
    )
    assert argv == ["data", "--config", "tiny", "seq_len=32"] and own == {"address": "http://h:8265", "no_wait": True}
    argv, own = jobs.split_submit_args(["pretrain", "--address=http://h:1", "--out", "s3://b/p"])
    assert argv == ["pretrain", "--out", "s3://b/p"] and own == {"address": "http://h:1"}
    with pytest.raises(ValueError, match="--address needs a value"):
        jobs.split_submit_args(["data", "--address"])


def test_job_server_address(monkeypatch):
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    assert jobs.job_server_address("http://10.0.0.1:8265") == "http://10.0.0.1:8265"
    assert jobs.job_server_address("127.0.0.1:8265") == "http://127.0.0.1:8265"
    # a GCS address in RAY_ADDRESS (for stages) is not a job server
    with pytest.raises(ValueError, match="no job server address"):
        jobs.job_server_address(None, fallback="10.0.0.1:6379")
    assert jobs.job_server_address(None, fallback="http://10.0.0.1:8265") == "http://10.0.0.1:8265"
    with pytest.raises(ValueError, match="give its URL"):
        jobs.job_server_address("auto")
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "http://head:8265")
    assert jobs.job_server_address(None, fallback="auto") == "http://head:8265"


def test_entrypoint_runs_the_uploaded_cli_with_quoting():
    assert (
        jobs.entrypoint(["data", "--out", "/data/my runs/x", "seq_len=32"])
        == "python -m cluster.cli data --out '/data/my runs/x' seq_len=32"
    )
    assert jobs.entrypoint(["sft"], log_level="DEBUG") == "python -m cluster.cli --log-level DEBUG sft"
    assert jobs.relative_outputs(["data", "--out", "runs/x"]) == ["runs/x"]
    assert jobs.relative_outputs(["data", "--out=s3://b/x", "--input", "rel"]) == []


def test_upload_size_follows_rays_exclusions_and_limit(tmp_path):
    wd = tmp_path / "proj"
    (wd / "pkg").mkdir(parents=True)
    (wd / "pkg" / "a.py").write_text("x = 1\n" * 1000)  # 6000 bytes, uploaded
    for skipped in (".venv", "runs", "__pycache__", "ignored"):
        (wd / skipped).mkdir()
        (wd / skipped / "big.bin").write_bytes(os.urandom(50_000))
    (wd / ".gitignore").write_text("ignored/\n")
    files = {p.relative_to(wd).as_posix() for p, _ in jobs.upload_files(wd, jobs.DEFAULT_EXCLUDES)}
    assert files == {"pkg/a.py", ".gitignore"}
    size = jobs.check_upload_size(wd, jobs.DEFAULT_EXCLUDES)
    assert 6009 < size < 6009 + 400, size  # the files plus zip headers (Ray stores files uncompressed)
    from ray._private import ray_constants
    from ray._private.runtime_env.packaging import create_package

    create_package(
        str(wd),
        tmp_path / "ray.zip",
        include_gitignore=True,
        excludes=ray_constants.get_runtime_env_default_excludes() + jobs.DEFAULT_EXCLUDES,
    )
    assert (tmp_path / "ray.zip").stat().st_size == size, "the estimate is the size of Ray's own package"
    # over the limit: refused, naming the biggest entry and what to do
    (wd / "data").mkdir()
    (wd / "data" / "blob.bin").write_bytes(os.urandom(40_000))
    with pytest.raises(ValueError, match=r"over Ray's limit of 0\.0 MiB; biggest entries: data .*--exclude"):
        jobs.check_upload_size(wd, jobs.DEFAULT_EXCLUDES, limit=20_000)
    assert jobs.check_upload_size(wd, jobs.DEFAULT_EXCLUDES + ["data"], limit=20_000) < 20_000
    # the project itself is far below Ray's real limit (512 MiB)
    assert jobs.check_upload_size(ROOT, jobs.DEFAULT_EXCLUDES) < 20 * 2**20 < jobs.upload_limit()


def test_bad_submissions_are_one_clear_line_and_submit_nothing(tmp_path):
    env = no_cluster_env()
    cases = [
        (["submit", "pretrian", "--config", "tiny"], "unknown stage 'pretrian'"),
        (["submit", "data", "--config", "tiny", "--bogus", "1"], "the data stage rejects these options"),
        (["submit", "data", "--config", "nosuch"], "unknown preset 'nosuch'"),
        (["submit", "pretrain", "--config", "tiny", "lr=3e-4"], "did you mean train.lr?; nothing was submitted"),
        (["submit", "pretrain", "--config", "tiny", "model.dim=wide"], "must be an integer"),
        (["submit", "data", "--config", "tiny"], "no job server address"),
        (["submit", "data", "--config", "tiny", "--address", "http://127.0.0.1:9"], "cannot reach the Ray job server"),
        (["jobs", "list", "--address", "http://127.0.0.1:9"], "cannot reach the Ray job server"),
    ]
    for argv, message in cases:
        r = genloop(*argv, env=env, timeout=120)
        assert r.returncode != 0 and message in r.stderr, (argv, r.stderr[-2000:])
        assert "Traceback" not in r.stderr, r.stderr
        assert "submitted job" not in r.stdout
    # the working-dir size check runs before any connection is tried
    big = tmp_path / "big"
    big.mkdir()
    (big / "blob.bin").write_bytes(os.urandom(3_000_000))
    r = genloop(
        "submit",
        "--working-dir",
        str(big),
        "data",
        "--config",
        "tiny",
        "--address",
        "http://127.0.0.1:9",
        env={**env, "RAY_max_grpc_message_size": "1000000"},
    )
    assert r.returncode == 1 and "over Ray's limit of 1.0 MiB" in r.stderr and "blob.bin" in r.stderr, r.stderr


def test_submit_help_shows_the_resource_table_and_stage_help():
    r = genloop("submit", "--help", env=no_cluster_env())
    assert r.returncode == 0 and "sft_worker" in r.stdout and "ray dashboard ray-cluster.yaml" in r.stdout
    r = genloop("submit", "data", "--help", env=no_cluster_env())
    assert r.returncode == 0 and "--seq-len" in r.stdout and "submitted job" not in r.stdout


# ---- a real head with the job server ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def head():
    cluster = LocalRayCluster(num_cpus=4).start()
    try:
        yield cluster
    finally:
        pgid = cluster._pgid
        cluster.cleanup()
        assert not _group_pids(pgid), "the head's processes are gone"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("corpus")
    for i, text in enumerate(stdlib_texts(4)):
        (d / f"doc{i}.py").write_text(text)
    return d


def job_ids(head) -> set[str]:
    """Submission ids on the head, straight from the Jobs REST API (with the cluster's token)."""
    import urllib.request

    req = urllib.request.Request(f"{head.dashboard_url}/api/jobs/", headers={"Authorization": f"Bearer {head.token}"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return {j["submission_id"] for j in json.loads(r.read())}


@pytest.mark.slow
def test_submit_data_stage_as_a_job(head, corpus, tmp_path):
    out = tmp_path / "data"
    r = genloop(
        "submit",
        "--submission-id",
        "genloop-test-data",
        "data",
        "--config",
        "tiny",
        "--input",
        str(corpus),
        "--out",
        str(out),
        "--address",
        head.dashboard_url,
        env=head.client_env(),
        timeout=600,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "submitted job genloop-test-data: python -m cluster.cli data --config tiny" in r.stdout
    assert f"data -> {out}" in r.stdout, "the job's logs were followed"
    assert "job genloop-test-data (data) SUCCEEDED" in r.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stage"] == "data" and manifest["status"] == "finished"
    assert manifest["counts"]["train_blocks"] > 0
    assert (out / "train").is_dir() and any((out / "train").glob("*.parquet"))
    status = genloop("jobs", "status", "genloop-test-data", "--address", head.dashboard_url, env=head.client_env())
    assert status.returncode == 0 and "genloop-test-data: SUCCEEDED" in status.stdout
    logs = genloop("jobs", "logs", "genloop-test-data", "--address", head.dashboard_url, env=head.client_env())
    assert logs.returncode == 0 and f"data -> {out}" in logs.stdout and "blocks train" in logs.stdout
    listed = genloop("jobs", "list", "--address", head.dashboard_url, env=head.client_env())
    assert listed.returncode == 0 and "genloop-test-data" in listed.stdout and "SUCCEEDED" in listed.stdout
    assert "genloop-test-data" in job_ids(head)


@pytest.mark.slow
def test_failing_job_reports_failed_with_its_error(head, tmp_path):
    r = genloop(
        "submit",
        "--submission-id",
        "genloop-test-fail",
        "data",
        "--config",
        "tiny",
        "--input",
        str(tmp_path / "missing" / "*.txt"),
        "--out",
        str(tmp_path / "out"),
        "--address",
        head.dashboard_url,
        env=head.client_env(),
        timeout=300,
    )
    assert r.returncode == 1, r.stdout[-2000:] + r.stderr[-2000:]
    assert "job genloop-test-fail (data) FAILED" in r.stderr and "matches no files" in r.stderr
    status = genloop("jobs", "status", "genloop-test-fail", "--address", head.dashboard_url, env=head.client_env())
    assert "genloop-test-fail: FAILED" in status.stdout


@pytest.mark.slow
def test_rejected_submissions_leave_no_job_behind(head, tmp_path):
    before = job_ids(head)
    env = head.client_env()
    bad = genloop("submit", "data", "--config", "tiny", "--no-such-flag", "--address", head.dashboard_url, env=env)
    assert bad.returncode == 1 and "rejects these options" in bad.stderr
    # token authentication is on: a client without the token is refused before anything is uploaded
    no_token = {**env, "RAY_AUTH_MODE": "disabled"}
    no_token.pop("RAY_AUTH_TOKEN")
    r = genloop("submit", "data", "--config", "tiny", "--address", head.dashboard_url, env=no_token)
    assert r.returncode == 1 and "token authentication" in r.stderr and "Nothing was submitted" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert job_ids(head) == before


@pytest.mark.slow
def test_no_wait_then_stop(head, tmp_path):
    # the tokenizer stage on the whole stdlib runs long enough to be stopped
    r = genloop(
        "submit",
        "--no-wait",
        "--submission-id",
        "genloop-test-stop",
        "tokenizer",
        "train",
        "--out",
        str(tmp_path / "tok"),
        "--address",
        head.dashboard_url,
        env=head.client_env(),
        timeout=120,
    )
    assert r.returncode == 0 and "submitted job genloop-test-stop" in r.stdout, r.stderr
    assert "genloop jobs logs genloop-test-stop --follow" in r.stdout
    stop = genloop("jobs", "stop", "genloop-test-stop", "--address", head.dashboard_url, env=head.client_env())
    assert stop.returncode == 0 and "genloop-test-stop: STOPPED" in stop.stdout, stop.stdout + stop.stderr
    assert not (tmp_path / "tok" / "tokenizer.tiktoken").exists()

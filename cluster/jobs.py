"""``genloop submit STAGE ...`` and ``genloop jobs list|status|logs|stop``: genloop stages as Ray jobs.

``submit`` runs ``python -m cluster.cli STAGE ...`` on a cluster through Ray's Jobs API (the job server in the head's
dashboard, ``http://HEAD:8265``), with this project as the job's ``working_dir``. Everything that can be checked
here is checked *before* anything is submitted: the stage name, the stage's own options (parsed by the stage's own
parser, not run), the upload size of the working dir against Ray's limit, and that the job server answers. So a bad
command never leaves a half-submitted job behind.

Inside the job, the stage connects to the cluster it runs on (Ray sets ``RAY_ADDRESS`` for job drivers). Output
paths are the cluster's: use an ``s3://`` / ``gs://`` URI (or a path on shared storage), since a relative path
lands in the job's temporary working dir.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shlex
import socket
import sys
import time
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlparse

PROJECT_ROOT = Path(__file__).resolve().parent.parent
# Never uploaded: virtualenvs, run outputs, caches, build metadata (.gitignore / .rayignore are honoured as well).
DEFAULT_EXCLUDES = [
    ".venv",
    "venv",
    "runs",
    ".git",
    "__pycache__",
    "*.pyc",
    "*.egg-info",
    ".pytest_cache",
    ".mypy_cache",
    ".ruff_cache",
    "/out",
    "/tmp",
]
# Options of `genloop submit` itself that may also follow the stage's options (no stage uses these names).
TRAILING_FLAGS = {"--address": True, "--no-wait": False}
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
CONNECT_TIMEOUT_S = 5.0
# commands that make no sense inside a Ray job (they drive the cluster or start their own)
NOT_SUBMITTABLE = ("submit", "jobs", "autoscale-proof")

EPILOG = """\
examples:
  genloop submit data --config demo --out s3://BUCKET/genloop/data --address http://127.0.0.1:8265
  genloop submit pretrain --config gpt2-124m --data /mnt/genloop/genloop/data \\
      --out s3://BUCKET/genloop/pretrain --no-wait
  genloop jobs list --address http://127.0.0.1:8265
  genloop jobs logs JOB_ID --follow

The job server address: --address, else $RAY_API_SERVER_ADDRESS, else `genloop --address` / $RAY_ADDRESS when it
is an http:// URL. Reach a cloud head through `ray dashboard ray-cluster.yaml` (an SSH port-forward to
127.0.0.1:8265), never a public port. With token authentication on (ray-cluster.yaml), export RAY_AUTH_MODE=token
and keep the cluster's token in ~/.ray/auth_token (or $RAY_AUTH_TOKEN).

What stages ask of the cluster (pipelines/resources.py), so the autoscaler adds the right node type:
"""


# ---- address and connection ---------------------------------------------------------------------------------------


def job_server_address(explicit: str | None, fallback: str | None = None) -> str:
    """``http://HOST:PORT`` of the job server, from ``--address``, ``RAY_API_SERVER_ADDRESS`` or an http fallback."""
    candidates = [explicit, os.environ.get("RAY_API_SERVER_ADDRESS"), fallback]
    for addr in candidates:
        if not addr:
            continue
        if addr == "auto" or addr.startswith("ray://") or (addr is fallback and "://" not in addr):
            if addr is explicit:
                raise ValueError(
                    f"--address {addr}: genloop submit/jobs talk to the job server in the head's "
                    "dashboard; give its URL, e.g. --address http://127.0.0.1:8265"
                )
            continue  # a GCS address in RAY_ADDRESS is for stages, not for the Jobs API
        return addr if "://" in addr else f"http://{addr}"
    raise ValueError(
        "no job server address: pass --address http://HEAD:8265 (forward it from a cloud head with "
        "`ray dashboard ray-cluster.yaml`) or set RAY_API_SERVER_ADDRESS"
    )


def check_reachable(address: str, timeout_s: float = CONNECT_TIMEOUT_S, note: str = "Nothing was submitted") -> None:
    """A TCP connect to the job server, so that an unreachable address is one clear line, not a long retry loop."""
    u = urlparse(address)
    if u.scheme not in ("http", "https") or not u.hostname:
        raise ValueError(f"--address {address}: expected http://HOST:PORT of the Ray dashboard (port 8265)")
    port = u.port or (443 if u.scheme == "https" else 80)
    try:
        with socket.create_connection((u.hostname, port), timeout=timeout_s):
            pass
    except OSError as e:
        raise ValueError(
            f"cannot reach the Ray job server at {address} ({e.strerror or e}); is the cluster up? "
            "For a cloud cluster run `ray dashboard ray-cluster.yaml` and use "
            f"--address http://127.0.0.1:8265. {note}"
        ) from None


def connect(address: str, note: str = "Nothing was submitted"):
    """A ``JobSubmissionClient`` for ``address``; connection and authentication failures become one line."""
    check_reachable(address, note=note)
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except Exception as e:  # ConnectionError, auth errors, version mismatch: all "cannot use this cluster"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        hint = ""
        if any(w in str(e).lower() for w in ("401", "403", "unauthorized", "forbidden", "token")):
            hint = (
                " The cluster uses token authentication: export RAY_AUTH_MODE=token and put the cluster's "
                "token in ~/.ray/auth_token or RAY_AUTH_TOKEN (`ray get-auth-token` on the head prints it)."
            )
        raise ValueError(f"cannot use the Ray job server at {address}: {first}.{hint} {note}") from None


# ---- what is submitted ---------------------------------------------------------------------------------------------


def split_submit_args(stage_args: list[str]) -> tuple[list[str], dict[str, Any]]:
    """``[STAGE, stage options..., --address A, --no-wait]`` -> (stage argv, {"address": A, "no_wait": True}).

    ``--address`` / ``--no-wait`` belong to ``genloop submit`` wherever they appear after the stage name."""
    argv: list[str] = []
    found: dict[str, Any] = {}
    it = iter(stage_args)
    for tok in it:
        name, eq, value = tok.partition("=")
        if name in TRAILING_FLAGS:
            key = name.lstrip("-").replace("-", "_")
            if TRAILING_FLAGS[name]:
                value = value if eq else next(it, None)
                if value is None:
                    raise ValueError(f"{name} needs a value (e.g. {name} http://127.0.0.1:8265)")
                found[key] = value
            else:
                found[key] = True
        else:
            argv.append(tok)
    return argv, found


def validate_stage_args(argv: list[str]) -> argparse.Namespace:
    """Parse ``STAGE options...`` with the stage's own parser (nothing runs). Raises ``ValueError`` on a bad stage
    name, bad options (argparse prints its usage line first), a missing preset or a malformed override."""
    from cluster.cli import build_parser
    from cluster.commands import BY_NAME
    from pipelines.config import parse_override, preset_path

    if not argv:
        raise ValueError(f"which stage? genloop submit STAGE [options]; stages: {', '.join(submittable())}")
    stage = argv[0]
    if stage not in BY_NAME or stage in NOT_SUBMITTABLE:
        raise ValueError(f"unknown stage {stage!r}; choose one of: {', '.join(submittable())}. Nothing was submitted")
    parser = build_parser(stage)
    parser.prog = "genloop submit"
    try:
        ns = parser.parse_args(argv)
    except SystemExit as e:
        if e.code == 0:  # --help
            raise
        raise ValueError(
            f"the {stage} stage rejects these options (see its usage above); nothing was submitted"
        ) from None
    config = getattr(ns, "config", None)
    named = not config or ("/" not in config and not config.endswith((".yaml", ".yml")))
    if config and named:
        preset_path(config)  # a named preset must exist in configs/ (ConfigError names the known ones)
    for text in getattr(ns, "overrides", None) or []:
        parse_override(text)
    module = BY_NAME[stage].load()
    if hasattr(module, "config") and named:
        # the stage's typed config from its preset, flags and overrides: an unknown key or a wrong type is refused
        # here (a YAML path is the cluster's, so it is checked there)
        try:
            module.config(ns)
        except ValueError as e:
            raise type(e)(f"{e}; nothing was submitted") from None
    return ns


def submittable() -> list[str]:
    from cluster.commands import COMMANDS

    return [c.name for c in COMMANDS if c.name not in NOT_SUBMITTABLE]


def relative_outputs(argv: list[str]) -> list[str]:
    """Values of ``--out`` that are relative paths: on a cluster they would land in the job's temporary dir."""
    outs = []
    for i, tok in enumerate(argv):
        value = (
            tok.partition("=")[2]
            if tok.startswith("--out=")
            else (argv[i + 1] if tok == "--out" and i + 1 < len(argv) else None)
        )
        if value and "://" not in value and not os.path.isabs(value):
            outs.append(value)
    return outs


def entrypoint(argv: list[str], log_level: str | None = None) -> str:
    """The job's shell command: this checkout's CLI, run from the uploaded working dir."""
    cmd = ["python", "-m", "cluster.cli"] + (["--log-level", log_level] if log_level else []) + argv
    return shlex.join(cmd)


def upload_limit() -> int:
    """Ray's limit on a working_dir package (bytes): the GCS's max gRPC message size."""
    from ray._private.runtime_env.packaging import GCS_STORAGE_MAX_SIZE

    return int(GCS_STORAGE_MAX_SIZE)


def _include_gitignore() -> bool:
    from ray._private import ray_constants

    return os.environ.get(ray_constants.RAY_RUNTIME_ENV_IGNORE_GITIGNORE, "0") != "1"


def upload_files(working_dir: Path, excludes: list[str]) -> list[tuple[Path, int]]:
    """(file, bytes) for every file Ray would upload from ``working_dir``, by Ray's own exclusion rules
    (``excludes`` + Ray's defaults + .gitignore/.rayignore)."""
    from ray._private import ray_constants
    from ray._private.runtime_env.packaging import _dir_travel, _get_excludes

    files: list[tuple[Path, int]] = []

    def handler(p: Path) -> None:
        if p.is_file() and not p.is_symlink():
            files.append((p, p.stat().st_size))

    all_excludes = ray_constants.get_runtime_env_default_excludes() + list(excludes)
    quiet = logging.getLogger("genloop.jobs.upload")  # Ray logs every ignore file it honours at INFO
    quiet.setLevel(logging.WARNING)
    _dir_travel(
        working_dir,
        [_get_excludes(working_dir, all_excludes)],
        handler,
        include_gitignore=_include_gitignore(),
        logger=quiet,
    )
    return files


def check_upload_size(working_dir: Path, excludes: list[str], limit: int | None = None) -> int:
    """Bytes of the package Ray would upload (its zip *stores* files: their sizes plus per-entry headers);
    ``ValueError`` naming the biggest entries when that is over ``limit`` (Ray's limit by default)."""
    limit = upload_limit() if limit is None else limit
    files = upload_files(working_dir, excludes)
    # zip local header + central directory entry: ~76 bytes fixed + the name twice (stored, no compression)
    total = sum(n + 76 + 2 * len(p.relative_to(working_dir).as_posix()) for p, n in files) + 22
    if total <= limit:
        return total
    by_top: dict[str, int] = {}
    for p, n in files:
        top = p.relative_to(working_dir).parts[0]
        by_top[top] = by_top.get(top, 0) + n
    biggest = ", ".join(f"{k} ({v / 2**20:.1f} MiB)" for k, v in sorted(by_top.items(), key=lambda kv: -kv[1])[:3])
    raise ValueError(
        f"working dir {working_dir} would upload {total / 2**20:.1f} MiB, over Ray's limit of "
        f"{limit / 2**20:.1f} MiB; biggest entries: {biggest}. Exclude them (--exclude PATTERN, or "
        "list them in .rayignore) and keep data on shared storage (s3://...). Nothing was submitted"
    )


# ---- following a job -----------------------------------------------------------------------------------------------


def follow(
    client,
    job_id: str,
    write: Callable[[str], Any] = sys.stdout.write,
    poll_s: float = 1.0,
    timeout_s: float | None = None,
) -> str:
    """Stream the job's logs until it ends; returns its final status (``SUCCEEDED`` / ``FAILED`` / ``STOPPED``)."""

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            write(chunk)
            if hasattr(sys.stdout, "flush"):
                sys.stdout.flush()

    try:
        asyncio.run(tail())
    except RuntimeError as e:  # the log stream broke; keep polling the status
        sys.stderr.write(f"genloop: log stream ended early ({e}); waiting for the job's status\n")
    return wait_terminal(client, job_id, poll_s, timeout_s)


def wait_terminal(client, job_id: str, poll_s: float = 1.0, timeout_s: float | None = None) -> str:
    t0 = time.monotonic()
    while True:
        status = str(client.get_job_status(job_id).value)
        if status in TERMINAL:
            return status
        if timeout_s is not None and time.monotonic() - t0 > timeout_s:
            return status
        time.sleep(poll_s)

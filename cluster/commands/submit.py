"""``genloop submit COMMAND [options]``: run a genloop command on a Ray cluster as a Ray job (logic: ``cluster.jobs``)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

HELP = "submit a genloop command as a Ray job"


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from cluster.jobs import DEFAULT_EXCLUDES, EPILOG, PROJECT_ROOT
    from pipelines.resources import table

    s = sub.add_parser(
        "submit",
        help=HELP,
        description="Submit `genloop COMMAND [options]` to a Ray cluster as a Ray job, print its id "
        "and follow its logs.",
        usage="genloop submit [--address URL] [--no-wait] [--submission-id ID] "
        "[--working-dir DIR] [--exclude PATTERN] COMMAND [options] "
        "[--address URL] [--no-wait]",
        epilog=EPILOG + table(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    s.add_argument(
        "--address",
        dest="job_address",
        default=None,
        metavar="URL",
        help="the job server, http://HEAD:8265 (also accepted after the command's options)",
    )
    s.add_argument("--no-wait", action="store_true", help="print the job id and return; don't follow the logs")
    s.add_argument("--submission-id", default=None, help="job id to use (default: Ray picks raysubmit_...)")
    s.add_argument("--working-dir", default=str(PROJECT_ROOT), help="uploaded as the job's working_dir")
    s.add_argument(
        "--exclude",
        action="append",
        default=[],
        metavar="PATTERN",
        help="also leave out of the upload (gitignore syntax; repeatable); always left out: "
        + " ".join(DEFAULT_EXCLUDES),
    )
    s.add_argument("stage_args", nargs=argparse.REMAINDER, metavar="COMMAND [options]")
    return s


def report_end(client, job_id: str, status: str, stage: str) -> int:
    if status == "SUCCEEDED":
        print(f"genloop submit: job {job_id} ({stage}) SUCCEEDED")
        return 0
    info = client.get_job_info(job_id)
    msg = (info.message or "").strip().splitlines()
    print(f"genloop submit: job {job_id} ({stage}) {status}: {msg[-1] if msg else 'no message'}", file=sys.stderr)
    return 1


def run(args: argparse.Namespace) -> int:
    from cluster.jobs import (
        DEFAULT_EXCLUDES,
        check_upload_size,
        connect,
        entrypoint,
        follow,
        job_server_address,
        relative_outputs,
        split_submit_args,
        validate_stage_args,
    )

    argv, trailing = split_submit_args(args.stage_args or [])
    no_wait = bool(args.no_wait or trailing.get("no_wait"))
    try:
        validate_stage_args(argv)
    except SystemExit:  # the command's --help was printed
        return 0
    stage = argv[0]
    address = job_server_address(trailing.get("address") or args.job_address, args.address)
    working_dir = Path(args.working_dir).resolve()
    if not working_dir.is_dir():
        raise FileNotFoundError(f"--working-dir {working_dir} is not a folder")
    excludes = DEFAULT_EXCLUDES + list(args.exclude or [])
    size = check_upload_size(working_dir, excludes)
    for rel in relative_outputs(argv):
        print(
            f"genloop submit: warning: --out {rel} is relative: on the cluster it lands in the job's temporary "
            "working dir; use an absolute path on shared storage or an s3:// / gs:// URI",
            file=sys.stderr,
        )
    # Ray logs each ignore file and its default excludes while packaging; genloop's excludes are deliberate
    logging.getLogger("ray._private.runtime_env").setLevel(logging.ERROR)
    logging.getLogger("ray.dashboard.modules.dashboard_sdk").setLevel(logging.WARNING)
    client = connect(address)
    runtime_env = {
        "working_dir": str(working_dir),
        "excludes": excludes,
        "env_vars": {"PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"},
    }
    ep = entrypoint(argv, args.log_level if args.log_level != "INFO" else None)
    job_id = client.submit_job(
        entrypoint=ep, runtime_env=runtime_env, submission_id=args.submission_id, metadata={"genloop_stage": stage}
    )
    print(f"submitted job {job_id}: {ep} ({size / 2**20:.2f} MiB working dir) to {address}", flush=True)
    if no_wait:
        print(f"follow it with: genloop jobs logs {job_id} --follow --address {address}")
        return 0
    try:
        status = follow(client, job_id)
    except KeyboardInterrupt:
        print(
            f"\nstopped following; the job keeps running. Stop it with: genloop jobs stop {job_id} --address {address}",
            file=sys.stderr,
        )
        return 130
    return report_end(client, job_id, status, stage)

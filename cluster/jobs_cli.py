"""``genloop submit`` / ``genloop jobs``: the command line over ``cluster.jobs`` (which holds the logic)."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from cluster.jobs import (DEFAULT_EXCLUDES, EPILOG, PROJECT_ROOT, TERMINAL, check_upload_size, connect, entrypoint, follow,
                          job_server_address, relative_outputs, split_submit_args, validate_stage_args,
                          wait_terminal)


def _report_end(client, job_id: str, status: str, stage: str) -> int:
    if status == "SUCCEEDED":
        print(f"genloop submit: job {job_id} ({stage}) SUCCEEDED")
        return 0
    info = client.get_job_info(job_id)
    msg = (info.message or "").strip().splitlines()
    print(f"genloop submit: job {job_id} ({stage}) {status}: {msg[-1] if msg else 'no message'}", file=sys.stderr)
    return 1


# ---- commands ------------------------------------------------------------------------------------------------------

def submit_cmd(args: argparse.Namespace) -> int:
    argv, trailing = split_submit_args(args.stage_args or [])
    no_wait = bool(args.no_wait or trailing.get("no_wait"))
    try:
        validate_stage_args(argv)
    except SystemExit:  # the stage's --help was printed
        return 0
    stage = argv[0]
    address = job_server_address(trailing.get("address") or args.job_address, args.address)
    working_dir = Path(args.working_dir).resolve()
    if not working_dir.is_dir():
        raise FileNotFoundError(f"--working-dir {working_dir} is not a folder")
    excludes = DEFAULT_EXCLUDES + list(args.exclude or [])
    size = check_upload_size(working_dir, excludes)
    for rel in relative_outputs(argv):
        print(f"genloop submit: warning: --out {rel} is relative: on the cluster it lands in the job's temporary "
              "working dir; use an absolute path on shared storage or an s3:// / gs:// URI", file=sys.stderr)
    # Ray logs each ignore file and its default excludes while packaging; genloop's excludes are deliberate
    logging.getLogger("ray._private.runtime_env").setLevel(logging.ERROR)
    logging.getLogger("ray.dashboard.modules.dashboard_sdk").setLevel(logging.WARNING)
    client = connect(address)
    runtime_env = {"working_dir": str(working_dir), "excludes": excludes,
                   "env_vars": {"PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}}
    ep = entrypoint(argv, args.log_level if args.log_level != "INFO" else None)
    job_id = client.submit_job(entrypoint=ep, runtime_env=runtime_env, submission_id=args.submission_id,
                               metadata={"genloop_stage": stage})
    print(f"submitted job {job_id}: {ep} ({size / 2**20:.2f} MiB working dir) to {address}", flush=True)
    if no_wait:
        print(f"follow it with: genloop jobs logs {job_id} --follow --address {address}")
        return 0
    try:
        status = follow(client, job_id)
    except KeyboardInterrupt:
        print(f"\nstopped following; the job keeps running. Stop it with: genloop jobs stop {job_id} "
              f"--address {address}", file=sys.stderr)
        return 130
    return _report_end(client, job_id, status, stage)


def jobs_cmd(args: argparse.Namespace) -> int:
    client = connect(job_server_address(args.job_address, args.address), note="")
    if args.action == "list":
        jobs = sorted(client.list_jobs(), key=lambda j: j.start_time or 0)
        print(f"{'job':32s} {'status':10s} {'started':19s} entrypoint")
        for j in jobs:
            started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime((j.start_time or 0) / 1000))
            print(f"{j.submission_id or j.job_id or '-':32s} {j.status.value:10s} {started:19s} {j.entrypoint}")
        return 0
    job_id = args.job_id
    try:
        info = client.get_job_info(job_id)
    except RuntimeError as e:
        raise ValueError(f"no job {job_id!r} on {client.get_address()} ({str(e).splitlines()[0]}); "
                         "`genloop jobs list` shows the jobs") from None
    if args.action == "status":
        print(f"{job_id}: {info.status.value}")
        if info.message:
            print(info.message.strip())
        return 0
    if args.action == "logs":
        if args.follow:
            status = follow(client, job_id)
            return 0 if status == "SUCCEEDED" else 1
        sys.stdout.write(client.get_job_logs(job_id))
        return 0
    if args.action == "stop":
        if info.status.value in TERMINAL:
            print(f"{job_id} already ended: {info.status.value}")
            return 0
        client.stop_job(job_id)
        status = wait_terminal(client, job_id, timeout_s=60)
        print(f"{job_id}: {status}")
        return 0 if status in TERMINAL else 1
    raise ValueError(f"unknown action {args.action!r}")


def register(sub: argparse._SubParsersAction) -> None:
    """Adds ``submit`` and ``jobs`` (whichever are not yet there)."""
    from cluster.resources import table

    if "submit" not in sub.choices:
        s = sub.add_parser("submit", help="submit a genloop stage as a Ray job",
                           description="Submit `genloop STAGE [stage options]` to a Ray cluster as a Ray job, print "
                                       "its id and follow its logs.",
                           usage="genloop submit [--address URL] [--no-wait] [--submission-id ID] "
                                 "[--working-dir DIR] [--exclude PATTERN] STAGE [stage options] "
                                 "[--address URL] [--no-wait]",
                           epilog=EPILOG + table(), formatter_class=argparse.RawDescriptionHelpFormatter)
        s.add_argument("--address", dest="job_address", default=None, metavar="URL",
                       help="the job server, http://HEAD:8265 (also accepted after the stage's options)")
        s.add_argument("--no-wait", action="store_true", help="print the job id and return; don't follow the logs")
        s.add_argument("--submission-id", default=None, help="job id to use (default: Ray picks raysubmit_...)")
        s.add_argument("--working-dir", default=str(PROJECT_ROOT), help="uploaded as the job's working_dir")
        s.add_argument("--exclude", action="append", default=[], metavar="PATTERN",
                       help="also leave out of the upload (gitignore syntax; repeatable); always left out: "
                            + " ".join(DEFAULT_EXCLUDES))
        s.add_argument("stage_args", nargs=argparse.REMAINDER, metavar="STAGE [stage options]")
        s.set_defaults(func=submit_cmd)
    if "jobs" not in sub.choices:
        j = sub.add_parser("jobs", help="list, inspect, follow or stop Ray jobs",
                           description="The Ray Jobs API of a cluster: list jobs, show one's status, print or follow "
                                       "its logs, stop it.")
        acts = j.add_subparsers(dest="action", metavar="ACTION", required=True)
        for name, help_text in (("list", "all jobs of the cluster"), ("status", "a job's status and message"),
                                ("logs", "a job's logs (--follow: until it ends)"), ("stop", "stop a running job")):
            a = acts.add_parser(name, help=help_text, description=help_text)
            a.add_argument("--address", dest="job_address", default=None, metavar="URL",
                           help="the job server, http://HEAD:8265")
            if name != "list":
                a.add_argument("job_id", metavar="JOB", help="submission id (raysubmit_...)")
            if name == "logs":
                a.add_argument("--follow", "-f", action="store_true", help="stream until the job ends")
        j.set_defaults(func=jobs_cmd)

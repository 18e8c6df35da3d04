"""``genloop jobs list|status|logs|stop``: the Ray Jobs API of a cluster (logic: ``cluster.jobs``)."""

from __future__ import annotations

import argparse
import sys
import time

HELP = "list, inspect, follow or stop Ray jobs"


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    j = sub.add_parser(
        "jobs",
        help=HELP,
        description="The Ray Jobs API of a cluster: list jobs, show one's status, print or follow its logs, stop it.",
    )
    acts = j.add_subparsers(dest="action", metavar="ACTION", required=True)
    for name, help_text in (
        ("list", "all jobs of the cluster"),
        ("status", "a job's status and message"),
        ("logs", "a job's logs (--follow: until it ends)"),
        ("stop", "stop a running job"),
    ):
        a = acts.add_parser(name, help=help_text, description=help_text)
        a.add_argument(
            "--address", dest="job_address", default=None, metavar="URL", help="the job server, http://HEAD:8265"
        )
        if name != "list":
            a.add_argument("job_id", metavar="JOB", help="submission id (raysubmit_...)")
        if name == "logs":
            a.add_argument("--follow", "-f", action="store_true", help="stream until the job ends")
    return j


def run(args: argparse.Namespace) -> int:
    from cluster.jobs import TERMINAL, connect, follow, job_server_address, wait_terminal

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
        raise ValueError(
            f"no job {job_id!r} on {client.get_address()} ({str(e).splitlines()[0]}); "
            "`genloop jobs list` shows the jobs"
        ) from None
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

"""``genloop deploy --model CKPT``: switch a running ``genloop serve`` application to another checkpoint without a
failed request (in place: every generator replica drains, reloads the new weights and resumes; the architecture and
tokenizer must match, else the server refuses with 409 and the old version keeps serving).

Two ways to reach the server:

- ``--url http://HOST:PORT`` (default ``http://127.0.0.1:8000``): ``POST /admin/models`` with an admin key
  (``--admin-key`` or ``--admin-key-file``; the server's ``serve.admin_key_file`` lists the admin keys);
- ``--address ADDR`` (or ``RAY_ADDRESS``): through the Ray cluster the application runs on (its ``--app-name``);
  holding the cluster is holding the server, so no admin key is asked.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cluster.commands.base import add_address, address_of

HELP = "switch a running server to another checkpoint, in place, without a failed request"


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("deploy", help=HELP, description=HELP, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument(
        "--model",
        required=True,
        metavar="CKPT",
        help="checkpoint folder (or an artifact holding model/, or an s3:// URI) to serve from now on",
    )
    p.add_argument(
        "--url",
        default=None,
        metavar="URL",
        help="the server's base URL (HTTP route; default http://127.0.0.1:8000 unless --address is given)",
    )
    p.add_argument("--admin-key", default=None, metavar="KEY", help="an admin key (HTTP route)")
    p.add_argument("--admin-key-file", default=None, metavar="F", help="a file whose first key is used (HTTP route)")
    p.add_argument("--app-name", default="genloop", help="the Serve application (Ray route)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the switch")
    add_address(p)
    return p


def admin_key(args: argparse.Namespace) -> str | None:
    if args.admin_key:
        return args.admin_key
    if args.admin_key_file:
        path = Path(args.admin_key_file)
        if not path.is_file():
            raise FileNotFoundError(f"--admin-key-file {path} does not exist")
        return next(
            (ln.strip() for ln in path.read_text().splitlines() if ln.strip() and not ln.lstrip().startswith("#")), None
        )
    return None


def model_arg(model: str) -> str:
    """A local path made absolute (the server resolves it on its own machine); a URI as is."""
    from pipelines.artifacts import absolute

    return absolute(model) or model


def over_http(url: str, model: str, key: str | None, timeout: float) -> tuple[int, dict]:
    import httpx

    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        r = httpx.post(url.rstrip("/") + "/admin/models", json={"model": model}, headers=headers, timeout=timeout)
    except httpx.HTTPError as e:
        raise ValueError(
            f"cannot reach the server at {url} ({type(e).__name__}: {e}); is `genloop serve` running there? (--url)"
        ) from None
    try:
        body = r.json()
    except ValueError:
        body = {"error": {"message": r.text[:500]}}
    return r.status_code, body


def over_ray(app_name: str, model: str, timeout: float) -> tuple[int, dict]:
    from ray import serve

    try:
        handle = serve.get_app_handle(app_name)
    except Exception as e:  # noqa: BLE001  (Serve raises several kinds for a missing application)
        raise ValueError(
            f"no Serve application {app_name!r} on this Ray cluster ({e}); start `genloop serve` or pass --app-name"
        ) from None
    out = handle.deploy_model.remote(model).result(timeout_s=timeout)
    return int(out.get("status", 200)), out


def run(args: argparse.Namespace) -> int:
    model = model_arg(args.model)
    address = address_of(args)
    if address and not args.url:
        from cluster.commands.base import start_ray

        start_ray(args)
        status, body = over_ray(args.app_name, model, args.timeout)
    else:
        status, body = over_http(args.url or "http://127.0.0.1:8000", model, admin_key(args), args.timeout)
    if status != 200 or "error" in body:
        err = body.get("error") or {}
        raise ValueError(
            f"the server refused the switch ({status} {err.get('code') or ''}): {err.get('message') or body}"
        )
    print(
        f"genloop deploy: now serving {body['model']} as version {body['model_version']} (was "
        f"{body['previous_version']}; {body['mode']} on {body['replicas']} replica(s), drain {body['drain_s']:.2f}s, "
        f"reload {body['reload_s']:.2f}s)"
    )
    print(json.dumps(body))
    return 0

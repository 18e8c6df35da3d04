"""Which checkpoint an application serves now, for generator replicas that start after a version switch (autoscaling
up, a replica Ray Serve replaced after a crash): they load the live checkpoint, not the one the app was deployed with.

One small named Ray actor per application (``LiveModel``, detached, no CPU) holds ``(model, version)`` under the
deployment's id: ``build_app`` draws a new id each time it builds the app, so a redeployed application starts from
its own ``--model`` again and never from a switch made to an earlier deployment.
"""

from __future__ import annotations

import logging

import ray

log = logging.getLogger(__name__)

NAMESPACE = "genloop"


@ray.remote(num_cpus=0)
class LiveModel:
    def __init__(self) -> None:
        self.entry: tuple[str, str, str] | None = None  # (deployment id, model, version)

    def set(self, deployment_id: str, model: str, version: str) -> None:
        self.entry = (deployment_id, model, version)

    def get(self, deployment_id: str) -> tuple[str, str] | None:
        if self.entry is None or self.entry[0] != deployment_id:
            return None
        return self.entry[1], self.entry[2]


def _name(app_name: str) -> str:
    return f"genloop-live-model:{app_name}"


def live_board(app_name: str):
    """The application's ``LiveModel`` actor, made when missing (the ingress makes it at start: starting an actor
    takes a worker process, which a switch should not wait for)."""
    return LiveModel.options(
        name=_name(app_name), namespace=NAMESPACE, lifetime="detached", get_if_exists=True
    ).remote()


def record_live(board, deployment_id: str, model: str, version: str) -> None:
    """At a switch: the checkpoint every replica of this deployment serves from now on."""
    ray.get(board.set.remote(deployment_id, model, version))


def find_board(app_name: str):
    """The application's ``LiveModel`` actor, or None when no ingress made it yet (blocking: a GCS lookup)."""
    try:
        return ray.get_actor(_name(app_name), namespace=NAMESPACE)
    except ValueError:
        return None


def live_model(app_name: str, deployment_id: str) -> tuple[str, str] | None:
    """(model, version) a switch made live in this deployment, or None (serve the deployed checkpoint)."""
    if not deployment_id:
        return None
    board = find_board(app_name)
    return None if board is None else ray.get(board.get.remote(deployment_id))

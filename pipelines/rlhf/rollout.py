"""Rollout workers: each owns one vLLM engine (through ``models/engine.py`` only) and samples groups of answers with
their token ids and log-probs; the learner pushes new weights into it in place after every update.

``RolloutWorker`` is a plain class (a test or a bench calls it without Ray); ``make_rollout_actors`` wraps it in Ray
actors (one engine each, restartable) the way OpenRLHF's ``RolloutRayActor`` does.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Sequence

from models import engine

log = logging.getLogger(__name__)


@dataclass
class SamplingConfig:
    """How answers are sampled each iteration (the same for every engine)."""

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1


class RolloutWorker:
    """One vLLM engine over a checkpoint folder, built with the weight-sync worker extension.

    Fault injection for the restart path (``rollout.inject_failure_at``, like ``train.inject_failure_at``): a generate
    call given a ``fail_marker`` path that does not exist yet writes it and exits the process.

    ``own_process`` (a Ray actor that is nothing but this engine, ``make_rollout_actors``): on CPU the engine runs
    in this process (``models.engine.make_llm(in_process=True)``); the actor only ever waits on its engine.
    """

    def __init__(
        self,
        model_path: str,
        engine_cfg: engine.EngineConfig,
        stop_ids: Sequence[int] = (),
        own_process: bool = False,
    ) -> None:
        t0 = time.perf_counter()
        # log-probs of the distribution the tokens were drawn from (after temperature): what importance sampling needs
        engine_cfg = dataclasses.replace(engine_cfg, logprobs_mode="processed_logprobs")
        self.llm = engine.make_llm(
            model_path, engine_cfg, worker_extension_cls=engine.WEIGHT_SYNC_EXTENSION, in_process=own_process
        )
        self.stop_ids = list(stop_ids)
        self.model_path = str(model_path)
        self.version = -1  # the learner iteration whose weights the engine holds (-1: the checkpoint's)
        log.info("rollout engine up in %.1fs (%s)", time.perf_counter() - t0, model_path)

    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"

    def generate(
        self, prompts: list[list[int]], n: int, sampling: SamplingConfig, seeds: list[int], fail_marker: str = ""
    ) -> list[list[engine.Completion]]:
        """``n`` answers per prompt; prompt i samples with ``seeds[i]`` (same seeds, same answers: resumable)."""
        if fail_marker:
            from pipelines.train.session import fail_once

            fail_once(fail_marker, "rollout actor (rollout.inject_failure_at)")
        params = [
            engine.sampling_params(
                sampling.max_new_tokens,
                sampling.temperature,
                sampling.top_p,
                sampling.top_k,
                stop_token_ids=self.stop_ids,
                seed=s,
                n=n,
                logprobs=0,
            )
            for s in seeds
        ]
        return engine.sample_with_logprobs(self.llm, prompts, params)

    def greedy(self, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        return engine.greedy(self.llm, prompts, max_new_tokens, stop_token_ids=self.stop_ids)

    def update_from_file(self, path: str, version: int) -> float:
        """Reload the weights in place from a safetensors file on this node; returns the seconds it took."""
        t0 = time.perf_counter()
        engine.update_weights_from_file(self.llm, path)
        self.version = version
        return time.perf_counter() - t0

    def update_from_state(self, state_dict: dict[str, Any], version: int) -> float:
        """Same from a state dict that travelled through Ray's object store (an engine on another node)."""
        t0 = time.perf_counter()
        engine.update_weights(self.llm, state_dict)
        self.version = version
        return time.perf_counter() - t0

    def holds_checkpoint(self, path: str) -> bool:
        """Does the engine still hold the weights of the checkpoint at ``path`` it was built from (none pushed)?"""
        return self.version == -1 and os.path.realpath(self.model_path) == os.path.realpath(path)

    def weights_version(self) -> int:
        return self.version


def make_rollout_actors(
    n: int,
    model_path: str,
    engine_cfg: engine.EngineConfig,
    stop_ids: Sequence[int],
    options: dict[str, float],
    max_restarts: int = -1,
) -> list:
    """``n`` Ray actors, one engine each, asking ``options`` (``pipelines/resources.py``: rollout_engine) each.

    ``max_restarts``: Ray re-creates a dead actor (its engine starts from ``model_path``, and the learner pushes its
    current weights before the next generate). The call that was running fails, so the learner restarts from its last
    checkpoint.
    """
    import ray

    cls = ray.remote(RolloutWorker)
    actors = [
        cls.options(max_restarts=max_restarts, max_concurrency=1, **options).remote(
            model_path, engine_cfg, list(stop_ids), own_process=True
        )
        for _ in range(n)
    ]
    ray.get([a.weights_version.remote() for a in actors])  # wait until every engine is up (clear errors here)
    return actors

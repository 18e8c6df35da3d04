"""The generator deployment: one vLLM ``AsyncLLM`` per replica (``models/engine.py``), token ids in, token id pieces
out, with stream coalescing (``coalesce``, a plain async helper tests drive without Ray), the live model version and
its in-place switch (``Generator.switch``), and embeddings (``serve.embeddings``) of the same live weights.

Version switch, per replica: close admission (new requests wait), let the requests in flight finish on the old
weights (up to ``drain_timeout_s``), reload the new checkpoint's weights into the running engine (the worker
extension RLHF uses), open admission. Every request runs wholly on one version and its first streamed item names it,
so no answer mixes two versions and none fails; requests that arrive meanwhile wait the drain plus the reload.
The ingress reaches every replica (``serve.versions.VersionSwitch``); a replica it could not reach (starting while the
live board changed, or not yet known to the handle's router) catches up with the board (``serve.live``) at its next
health check (``check_health``, every ``health_check_period_s``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any, AsyncIterator, Callable

from ray import serve

from models.engine import EngineConfig
from serve.versions import SwitchError

log = logging.getLogger(__name__)

# one engine step of one request: {sample index: (new token ids, finish reason or None, token log-probs or None)}
# (models.engine.stream_outputs)
Delta = tuple[list[int], "str | None", "list | None"]
Piece = dict[int, Delta]


def merge(a: Piece, b: Piece) -> Piece:
    """``b`` after ``a``: per sample, the ids (and log-probs) concatenated, the latest finish reason kept."""
    out = dict(a)
    for i, (ids, fin, lps) in b.items():
        if i in out:
            ids0, fin0, lps0 = out[i]
            out[i] = (ids0 + ids, fin or fin0, (lps0 or []) + lps if lps is not None else lps0)
        else:
            out[i] = (ids, fin, lps)
    return out


async def coalesce(source: AsyncIterator[Piece], interval: Callable[[], float]) -> AsyncIterator[Piece]:
    """Re-yield ``source``'s pieces merged: the first at once (time to first token), the last as soon as the source
    ends, and in between at most one piece per ``interval()`` seconds (asked before each wait; 0 = no waiting), the
    pieces that arrived meanwhile merged (``merge``). The source runs as its own task, so it never waits for the
    consumer; an error in it is raised here; when the consumer stops early the source task is cancelled (for vLLM:
    the request is aborted)."""
    queue: asyncio.Queue = asyncio.Queue()
    ended = asyncio.Event()

    async def pump() -> None:
        try:
            async for item in source:
                queue.put_nowait(item)
            queue.put_nowait(None)
        except Exception as e:  # noqa: BLE001  (re-raised in the consumer)
            queue.put_nowait(e)
        ended.set()

    task = asyncio.create_task(pump())
    try:
        done, first = False, True
        while not done:
            wait = interval()
            if not first and wait > 0 and not ended.is_set():
                try:  # gather the pieces of one interval; wake early when the source ends
                    await asyncio.wait_for(ended.wait(), wait)
                except asyncio.TimeoutError:
                    pass
            items = [await queue.get()]
            while not queue.empty():
                items.append(queue.get_nowait())
            piece: Piece = {}
            for it in items:
                if it is None:
                    done = True
                elif isinstance(it, Exception):
                    raise it
                else:
                    piece = merge(piece, it)
            if any(ids or fin for ids, fin, _ in piece.values()):
                first = False
                yield piece
    finally:
        task.cancel()


@serve.deployment(name="Generator")
class Generator:
    """Holds one vLLM ``AsyncLLM`` (CUDA build on GPUs, CPU build here); token ids in, token id pieces out.
    ``model`` may be a URI: the replica downloads it once into its node's cache."""

    def __init__(
        self,
        model: str,
        engine: EngineConfig,
        stream_messages_per_s: float = 0.0,
        max_stream_interval_ms: float = 250.0,
        drain_timeout_s: float = 120.0,
        structured_outputs: bool = True,
        deployment_id: str = "",
        json_any_whitespace: bool = False,
    ) -> None:
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # before vLLM's first import in this replica
        from models.engine import WEIGHT_SYNC_EXTENSION, make_async_engine
        from pipelines.artifacts import checkpoint_dir
        from serve.live import live_model
        from serve.versions import model_version, weight_files

        context = serve.get_replica_context()
        self.replica = context.replica_id.unique_id  # names this replica in a switch's answers (serve.versions)
        self.app_name, self.deployment_id = context.app_name, deployment_id
        self.board = None  # the live board's actor handle, looked up at the first health check
        self.catch_up: asyncio.Task | None = None
        self.failed_version: str | None = None  # a live version this replica could not load: not retried
        live = live_model(context.app_name, deployment_id)
        if live is not None:  # a replica started after a version switch: serve the live checkpoint
            model = live[0]
        local = checkpoint_dir(model)
        version = live[1] if live is not None else model_version(model, local)
        self.model, self.version, self.weights = model, version, weight_files(local)
        self.local = local
        self.engine = make_async_engine(
            local,
            engine,
            worker_extension_cls=WEIGHT_SYNC_EXTENSION,
            tokenizer=structured_outputs,
            json_any_whitespace=json_any_whitespace,
        )
        self.rate = stream_messages_per_s
        self.max_interval = max_stream_interval_ms / 1000.0
        self.drain_timeout_s = drain_timeout_s
        self.active = 0  # requests admitted and not finished (streams and embeddings)
        self.admitting = asyncio.Event()  # cleared while a version switch drains and reloads
        self.admitting.set()
        self.switching = asyncio.Lock()
        self.embedder = None  # serve.embeddings.Embedder of the live weights, made on first use
        log.info("generator serves %s (version %s)", model, self.version)

    def interval(self) -> float:
        """Seconds between a stream's pieces: the replica's message budget shared by its active streams."""
        return min(self.max_interval, self.active / self.rate) if self.rate > 0 else 0.0

    async def _admit(self) -> str:
        """Wait while a switch is under way, then count the request in; returns the version it runs on. No await
        between the check and the count, so a switch that starts draining sees every admitted request."""
        while not self.admitting.is_set():
            await self.admitting.wait()
        self.active += 1
        return self.version

    async def generate(
        self, prompt_ids: list[int], params: dict[str, Any], request_id: str
    ) -> AsyncIterator[str | Piece]:
        """Streams the model version (first item, a str), then pieces ``{sample index: (new_ids, finish_reason,
        logprobs)}``; ``params`` are ``models.engine.streaming_params`` keyword args. Pieces are coalesced
        (``coalesce``) at active streams / ``stream_messages_per_s`` seconds (capped at ``max_stream_interval_ms``):
        one stream alone sends nearly every token; 32 streams send a few tokens per piece, so the Ray messages per
        second stay bounded and the CPU goes to generating."""
        from models.engine import stream_outputs, streaming_params

        version = await self._admit()
        try:
            yield version
            async for piece in coalesce(
                stream_outputs(self.engine, prompt_ids, streaming_params(**params), request_id), self.interval
            ):
                yield piece
        finally:
            self.active -= 1

    async def embed(self, inputs: list[list[int]], pooling: str) -> tuple[str, list[list[float]]]:
        """(version, one unit vector per token-id list): hidden states of the live weights, pooled
        (``serve.embeddings``)."""
        from serve.embeddings import Embedder

        version = await self._admit()
        try:
            if self.embedder is None:
                self.embedder = await asyncio.to_thread(Embedder.load, self.local)
            return version, await asyncio.to_thread(self.embedder.embed, inputs, pooling)
        finally:
            self.active -= 1

    def info(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "model_version": self.version,
            "switching": not self.admitting.is_set(),
            "replica": self.replica,
        }

    async def switch(self, model: str, version: str) -> dict[str, Any]:
        """Serve the checkpoint ``model`` (checked by the caller: ``serve.versions.incompatibilities`` is empty) as
        ``version``, in place: close admission, drain, reload, open. A reload that fails puts the old weights back
        and raises ``SwitchError`` (400); a drain that does not finish within ``drain_timeout_s`` raises one (503).
        Either way the old version keeps serving."""
        from models.engine import reload_async_engine
        from pipelines.artifacts import checkpoint_dir
        from serve.versions import weight_files

        async with self.switching:
            if version == self.version:
                return dict(self.info(), changed=False, drain_s=0.0, reload_s=0.0)
            local = await asyncio.to_thread(checkpoint_dir, model)  # a URI downloads before admission closes
            files = weight_files(local)
            t0 = time.perf_counter()
            self.admitting.clear()
            try:
                while self.active:
                    if time.perf_counter() - t0 > self.drain_timeout_s:
                        raise SwitchError(
                            f"{self.active} requests were still running after {self.drain_timeout_s:.0f}"
                            f" s (serve.switch_drain_timeout_s); {self.version} keeps serving; retry "
                            "later",
                            503,
                            "switch_busy",
                        )
                    await asyncio.sleep(0.005)
                t1 = time.perf_counter()
                try:
                    await reload_async_engine(self.engine, files)
                except Exception as e:  # noqa: BLE001  (put the old weights back, then refuse)
                    log.exception("reloading %s failed; restoring %s", model, self.version)
                    await reload_async_engine(self.engine, self.weights)
                    raise SwitchError(
                        f"checkpoint {model} did not load ({type(e).__name__}: {e}); version "
                        f"{self.version} keeps serving",
                        400,
                        "checkpoint_load_failed",
                    ) from None
                old = self.version
                self.model, self.version, self.weights, self.local = model, version, files, local
                self.embedder = None
            finally:
                self.admitting.set()
            t2 = time.perf_counter()
            log.info("switched %s -> %s in place (drain %.3fs, reload %.3fs)", old, version, t1 - t0, t2 - t1)
            return dict(
                self.info(), changed=True, previous_version=old, drain_s=round(t1 - t0, 4), reload_s=round(t2 - t1, 4)
            )

    async def check_health(self) -> None:
        await self.engine.check_health()
        await self._follow_live_board()

    async def _follow_live_board(self) -> None:
        """When the live board names another version than this replica serves (a switch's broadcast did not reach
        it), switch to it in the background. Never raises: a health check must not fail for it."""
        if not self.deployment_id or self.switching.locked() or (self.catch_up and not self.catch_up.done()):
            return
        try:
            if self.board is None:
                from serve.live import find_board

                self.board = await asyncio.to_thread(find_board, self.app_name)
                if self.board is None:
                    return
            live = await self.board.get.remote(self.deployment_id)
        except Exception as e:  # noqa: BLE001  (the board is an optimisation of consistency, not a dependency)
            log.warning("cannot read the live board (%s: %s); the next health check tries again", type(e).__name__, e)
            self.board = None
            return
        if live is None or live[1] in (self.version, self.failed_version):
            return
        log.warning(
            "replica %s serves %s but %s is live (a switch did not reach it): switching",
            self.replica,
            self.version,
            live[1],
        )
        self.catch_up = asyncio.get_running_loop().create_task(self._catch_up(*live))

    async def _catch_up(self, model: str, version: str) -> None:
        try:
            await self.switch(model, version)
        except Exception:  # noqa: BLE001  (logged; this version is not retried by the health checks)
            log.exception(
                "replica %s could not switch to the live version %s; it keeps serving %s",
                self.replica,
                version,
                self.version,
            )
            self.failed_version = version

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()

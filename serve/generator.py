"""The generator deployment: one vLLM ``AsyncLLM`` per replica (``models/engine.py``), token ids in, token id pieces
out, with stream coalescing (``coalesce``, a plain async helper tests drive without Ray)."""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any, AsyncIterator, Callable

from ray import serve

from models.engine import EngineConfig

log = logging.getLogger(__name__)

Piece = tuple[list[int], "str | None"]  # (new token ids, finish reason or None)


async def coalesce(source: AsyncIterator[Piece], interval: Callable[[], float]) -> AsyncIterator[Piece]:
    """Re-yield ``source``'s pieces merged: the first at once (time to first token), the last as soon as the source
    ends, and in between at most one piece per ``interval()`` seconds (asked before each wait; 0 = no waiting), the
    ids of the pieces that arrived meanwhile concatenated and the latest finish reason kept. The source runs as its
    own task, so it never waits for the consumer; an error in it is raised here; when the consumer stops early the
    source task is cancelled (for vLLM: the request is aborted)."""
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
            ids: list[int] = []
            finish = None
            for it in items:
                if it is None:
                    done = True
                elif isinstance(it, Exception):
                    raise it
                else:
                    ids += it[0]
                    finish = it[1] or finish
            if ids or finish:
                first = False
                yield ids, finish
    finally:
        task.cancel()


@serve.deployment(name="Generator")
class Generator:
    """Holds one vLLM ``AsyncLLM`` (CUDA build on GPUs, CPU build here); token ids in, token id pieces out.
    ``model`` may be a URI: the replica downloads it once into its node's cache."""

    def __init__(self, model: str, engine: EngineConfig, stream_messages_per_s: float = 0.0,
                 max_stream_interval_ms: float = 250.0) -> None:
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # before vLLM's first import in this replica
        from models.engine import make_async_engine
        from pipelines.artifacts import checkpoint_dir

        self.engine = make_async_engine(checkpoint_dir(model), engine)
        self.rate = stream_messages_per_s
        self.max_interval = max_stream_interval_ms / 1000.0
        self.active = 0  # requests streaming now

    def interval(self) -> float:
        """Seconds between a stream's pieces: the replica's message budget shared by its active streams."""
        return min(self.max_interval, self.active / self.rate) if self.rate > 0 else 0.0

    async def generate(self, prompt_ids: list[int], params: dict[str, Any], request_id: str) -> AsyncIterator[Piece]:
        """Streams ``(new_ids, finish_reason)``; ``params`` are ``models.engine.streaming_params`` keyword args.
        Pieces are coalesced (``coalesce``) at active streams / ``stream_messages_per_s`` seconds (capped at
        ``max_stream_interval_ms``): one stream alone sends nearly every token; 32 streams send a few tokens per
        piece, so the Ray messages per second stay bounded and the CPU goes to generating."""
        from models.engine import stream_ids, streaming_params

        self.active += 1
        try:
            async for piece in coalesce(stream_ids(self.engine, prompt_ids, streaming_params(**params), request_id),
                                        self.interval):
                yield piece
        finally:
            self.active -= 1

    async def check_health(self) -> None:
        await self.engine.check_health()

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()

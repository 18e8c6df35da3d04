"""Stream coalescing (serve.generator.coalesce) and handle-error unwrapping (serve.api), without Ray or vLLM."""

from __future__ import annotations

import asyncio

import pytest

from serve.api import as_api_error, unwrap
from serve.feedback import FeedbackError, NotFound
from serve.generator import coalesce, merge
from serve.versions import SwitchError


async def _source(n: int, every: float, log: list, fail_at: int | None = None):
    try:
        for i in range(n):
            await asyncio.sleep(every)
            if i == fail_at:
                raise RuntimeError("engine died")
            yield {0: ([i], ("stop" if i == n - 1 else None), None)}
    finally:
        log.append("closed")


async def _collect(gen) -> list:
    """Sample 0's (ids, finish) per coalesced piece."""
    return [(p[0][0], p[0][1]) async for p in gen]


def test_no_interval_passes_every_piece():
    log: list = []
    out = asyncio.run(_collect(coalesce(_source(5, 0.005, log), lambda: 0.0)))
    assert out == [([0], None), ([1], None), ([2], None), ([3], None), ([4], "stop")]


def test_interval_merges_pieces_first_alone_last_keeps_finish():
    log: list = []
    out = asyncio.run(_collect(coalesce(_source(40, 0.002, log), lambda: 0.03)))
    ids = [i for piece, _ in out for i in piece]
    assert ids == list(range(40))  # nothing lost or reordered
    assert out[0] == ([0], None)  # time to first token: the first piece goes out alone
    assert out[-1][1] == "stop" and all(f is None for _, f in out[:-1])
    assert len(out) < 20  # ~2 ms pieces gathered over 30 ms windows


def test_error_in_source_is_raised_and_early_stop_cancels_source():
    log: list = []
    with pytest.raises(RuntimeError, match="engine died"):
        asyncio.run(_collect(coalesce(_source(10, 0.001, log, fail_at=3), lambda: 0.0)))

    async def first_two():
        gen = coalesce(_source(1000, 0.001, log), lambda: 0.0)
        got = [(p[0][0], p[0][1]) for p in (await gen.__anext__(), await gen.__anext__())]
        await gen.aclose()
        await asyncio.sleep(0.01)  # let the cancelled source task run its finally
        return got

    log.clear()
    assert asyncio.run(first_two()) == [([0], None), ([1], None)]
    assert log == ["closed"]


def test_wrapped_deployment_errors_map_to_http_answers():
    class Wrapper(Exception):  # what a Ray handle raises: the replica's exception kept as `cause`
        def __init__(self, cause):
            super().__init__(str(cause))
            self.cause = cause

    nf = unwrap(Wrapper(Wrapper(NotFound("no response 'x'"))))
    assert isinstance(nf, NotFound)
    assert as_api_error(nf).status == 404
    assert as_api_error(unwrap(Wrapper(FeedbackError("rating 9 is out of range")))).status == 400
    assert as_api_error(unwrap(Wrapper(RuntimeError("boom")))) is None  # a real failure stays a 500


def test_merge_keeps_samples_apart_and_logprobs_aligned():
    a = {0: ([1, 2], None, [[-0.1, []], [-0.2, []]]), 1: ([7], None, [[-0.7, []]])}
    b = {1: ([8], "length", [[-0.8, [[8, -0.8]]]]), 0: ([3], "stop", [[-0.3, []]])}
    m = merge(a, b)
    assert m[0] == ([1, 2, 3], "stop", [[-0.1, []], [-0.2, []], [-0.3, []]])
    assert m[1] == ([7, 8], "length", [[-0.7, []], [-0.8, [[8, -0.8]]]])
    assert merge({}, {0: ([5], None, None)}) == {0: ([5], None, None)}  # no log-probs asked: stays None


def test_switch_error_crosses_ray_as_itself():
    import pickle

    e = pickle.loads(pickle.dumps(SwitchError("weights differ", 409, "incompatible_checkpoint")))
    assert (e.status, e.code, str(e)) == (409, "incompatible_checkpoint", "weights differ")
    err = as_api_error(e)
    assert err.status == 409 and err.code == "incompatible_checkpoint" and err.param == "model"

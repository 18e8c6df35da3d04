"""The streaming training loader: row stores, the global sample order (independent of the worker count), resume
from consumed samples, bounded memory, and an elastic resume (2 workers -> 1) through the real training loop."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines.train.loader import RankLoader, SampleOrder, epoch_order, rank_span, val_rows
from pipelines.train.objective import IGNORE, LMObjective
from pipelines.train.row_store import UNITS, RowStore, array_batches, write_rows


def lm_store(path: Path, n: int, seq: int = 8, seed: int = 0) -> RowStore:
    """n LM rows whose first input id is the row number (so a row read back names itself)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 100, size=(n, seq), dtype=np.int32)
    ids[:, 0] = np.arange(n)
    labels = ids.copy()
    labels[:, :2] = IGNORE  # two unlabelled tokens a row: units = seq - 2
    return write_rows(
        array_batches({"input_ids": ids, "labels": labels}, batch_rows=7), str(path), LMObjective(), "rows"
    )


def global_batches(
    store: RowStore, B: int, world: int, steps: int, consumed: int = 0, seed: int = 3, prefetch: int = 0
) -> list[list[int]]:
    """The row ids of each global batch as the ranks of a ``world``-worker run read them (rank order)."""
    per_rank = [
        [
            rows["input_ids"][:, 0].tolist()
            for _, rows, _ in RankLoader(store, B, r, world, seed, True, prefetch=prefetch).batches(consumed, steps)
        ]
        for r in range(world)
    ]
    return [sum((per_rank[r][s] for r in range(world)), []) for s in range(steps)]


# ---- the store -----------------------------------------------------------------------------------------------------
def test_store_reads_exactly_the_rows_asked_for(tmp_path):
    store = lm_store(tmp_path / "s", 30)
    assert len(store) == 30 and set(store.columns) == {"input_ids", "labels", UNITS}
    ids = np.array([5, 6, 7, 29, 0, 5])  # a run, the last row, the first, a repeat
    got = store.read(ids)
    assert got["input_ids"][:, 0].tolist() == ids.tolist() and got["input_ids"].dtype == np.int32
    row_bytes = 2 * 8 * 4
    assert store.bytes_read == len(ids) * row_bytes and store.rows_read == len(ids)  # nothing but those rows
    assert (store.read_column(UNITS) == 6).all()  # seq 8 minus the two IGNORE labels
    reopened = RowStore(str(tmp_path / "s"))
    np.testing.assert_array_equal(reopened.read([7])["labels"], store.read([7])["labels"])
    with pytest.raises(IndexError, match="outside"):
        store.read([30])


def test_store_rejects_ragged_rows_and_unfinished_folders(tmp_path):
    bad = [
        {"input_ids": np.zeros((2, 4)), "labels": np.zeros((2, 4))},
        {"input_ids": np.zeros((2, 5)), "labels": np.zeros((2, 5))},
    ]
    with pytest.raises(ValueError, match="same length"):
        write_rows(bad, str(tmp_path / "ragged"), LMObjective(), "rows")
    with pytest.raises(ValueError, match="needs row columns"):
        write_rows([{"input_ids": np.zeros((2, 4))}], str(tmp_path / "nolabels"), LMObjective(), "training rows")
    (tmp_path / "half").mkdir()
    with pytest.raises(FileNotFoundError, match="not a finished row store"):
        RowStore(str(tmp_path / "half"))


# ---- the order -----------------------------------------------------------------------------------------------------
def test_epochs_are_seeded_permutations_and_the_stream_crosses_epochs():
    a = epoch_order(20, 1, 0, True)
    assert sorted(a.tolist()) == list(range(20)) and (a == epoch_order(20, 1, 0, True)).all()
    assert not (epoch_order(20, 1, 1, True) == a).all() and not (epoch_order(20, 2, 0, True) == a).all()
    assert epoch_order(5, 1, 0, False).tolist() == [0, 1, 2, 3, 4]
    order = SampleOrder(20, 1, True)
    stream = order.ids(14, 12)  # places 14..25: the end of epoch 0 then the start of epoch 1
    assert stream.tolist() == a[14:].tolist() + epoch_order(20, 1, 1, True)[:6].tolist()
    assert rank_span(8, 1, 4) == slice(2, 4)
    with pytest.raises(ValueError, match="does not split"):
        rank_span(6, 0, 4)


def test_global_batches_are_the_same_for_1_2_and_4_workers(tmp_path):
    store = lm_store(tmp_path / "s", 50)
    B, steps = 8, 13  # 104 samples: two epochs and a bit, batches straddling the epoch ends
    one = global_batches(store, B, 1, steps)
    assert global_batches(store, B, 2, steps) == one
    assert global_batches(store, B, 4, steps, prefetch=2) == one  # read-ahead does not change the order
    flat = sum(one, [])
    assert sorted(flat[:50]) == list(range(50)) and sorted(flat[50:100]) == list(range(50))  # each row once an epoch
    assert sum(b == list(range(b[0], b[0] + B)) for b in one) == 0  # shuffled: no batch is a run of neighbours


def test_resume_needs_only_consumed_samples_at_any_worker_count(tmp_path):
    store = lm_store(tmp_path / "s", 50)
    B = 8
    whole = global_batches(store, B, 2, 10)
    # 4 steps on 2 workers = 32 samples consumed; resume with 1 or 4 workers from that number alone
    assert global_batches(store, B, 1, 6, consumed=32) == whole[4:]
    assert global_batches(store, B, 4, 6, consumed=32) == whole[4:]
    # the global batch's loss units are known to every rank without talking: B rows x 6 labelled tokens
    _, _, units = next(RankLoader(store, B, 1, 2, 3, True, prefetch=0).batches(32, 1))
    assert units == B * 6


def test_validation_rows_are_the_same_whatever_the_worker_count(tmp_path):
    store = lm_store(tmp_path / "s", 10)
    one = val_rows(store, 8, 0, 1)["input_ids"][:, 0].tolist()
    two = sum((val_rows(store, 8, r, 2)["input_ids"][:, 0].tolist() for r in range(2)), [])
    assert one == two == list(range(8))
    assert val_rows(store, 8, 0, 16) == {}  # fewer rows than workers


def _iterate_and_measure(store: RowStore, steps: int) -> tuple[int, int]:
    """(peak Python/numpy heap bytes while building the loader and reading ``steps`` batches, bytes read)."""
    tracemalloc.start()
    tracemalloc.reset_peak()
    loader = RankLoader(store, 16, 0, 2, 0, True, prefetch=2)
    for _, rows, _ in loader.batches(0, steps):
        assert len(rows["input_ids"]) == 8
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak, loader.bytes_read


def test_memory_does_not_grow_with_the_dataset(tmp_path):
    """The same 40 steps over a 1x and an 8x corpus: every worker reads exactly its rows (bytes read equal, 1/2 of
    the rows it trains on), and the heap peak grows by the sample index only (8 bytes a row: order + units), not by
    the 8x bytes of the corpus."""
    seq, steps = 256, 40
    small, big = lm_store(tmp_path / "x1", 400, seq), lm_store(tmp_path / "x8", 3200, seq)
    row_bytes = 2 * seq * 4
    peak1, read1 = _iterate_and_measure(small, steps)
    peak8, read8 = _iterate_and_measure(big, steps)
    assert read1 == read8 == steps * 8 * row_bytes  # this rank's rows only, whatever the corpus size
    index_growth = 16 * (len(big) - len(small))  # int64 permutation drawn, int32 kept, float32 units
    assert peak8 - peak1 <= index_growth + 64 * 1024, (peak1, peak8)
    assert peak8 < 0.1 * big.nbytes(), (peak8, big.nbytes())  # a small fraction of the corpus


# ---- elastic resume through the real loop --------------------------------------------------------------------------
def _blocks(n=48, seq=32, vocab=200, seed=5):
    return np.random.default_rng(seed).integers(0, vocab, size=(n, seq + 1))


@pytest.mark.slow
def test_checkpoint_at_2_workers_resumes_at_1_and_matches_an_uninterrupted_run(
    ray_session, tmp_path, tiny_tokenizer_dir
):
    """DDP on 2 workers dies after its step-2 checkpoint; the same command with 1 worker (same global batch of 4
    rows: 2 micro-batches of 2) resumes from consumed_samples = 8 and ends with the weights and loss curve of an
    uninterrupted single-process run."""
    from safetensors.torch import load_file

    from pipelines.train.loop import TrainLoopConfig, fit, hf_export
    from tests.helpers import tiny_builder

    blocks = _blocks()
    rows = {"input_ids": blocks[:, :-1], "labels": blocks[:, 1:]}
    common = dict(
        steps=4,
        micro_batch_size=2,
        global_batch_size=4,
        lr=3e-3,
        warmup_steps=1,
        log_every=1,
        eval_every=100,
        ckpt_every=2,
        progress=False,
        name="elastic",
    )
    export = hf_export(str(tiny_tokenizer_dir))
    ref = fit(
        TrainLoopConfig(strategy="none", **common),
        tiny_builder(1024),
        rows,
        None,
        str(tmp_path / "ref"),
        export=export,
        in_process=True,
    )
    out = tmp_path / "elastic"
    with pytest.raises(Exception):  # rank 1 exits at step 3 and no restart is allowed: the job dies
        fit(
            TrainLoopConfig(strategy="ddp", num_workers=2, inject_failure_at=3, **common),
            tiny_builder(1024),
            rows,
            None,
            str(out),
            export=export,
        )
    assert (out / ".injected_failure_3").exists()
    state = (out / "train_runs" / "elastic" / "step_00000002" / "loop_state.json").read_text()
    assert '"consumed_samples": 8' in state and '"world": 2' in state
    got = fit(
        TrainLoopConfig(strategy="none", **common),
        tiny_builder(1024),
        rows,
        None,
        str(out),
        export=export,
        in_process=True,
    )
    assert [h["step"] for h in got.history] == [1, 2, 3, 4]
    np.testing.assert_allclose([h["loss"] for h in got.history], [h["loss"] for h in ref.history], rtol=1e-4)
    assert got.metrics["consumed_samples"] == 16
    a = load_file(str(Path(ref.model_dir) / "model.safetensors"))
    b = load_file(str(out / "model" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)

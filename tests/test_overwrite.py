"""One stage lifecycle (``pipelines/lifecycle.py``) for every stage. Its guards on their own (no Ray): inputs must
exist, a folder that is not a genloop artifact is never written into or cleared, nor is an input inside ``--out`` or
an artifact nested in it. And for every training stage: a finished run re-run with ``--overwrite`` and another
learning rate trains afresh (other weights: nothing resumed from the old run's checkpoints), and a re-run without
``--overwrite`` is refused and leaves the artifact as it was. Reward and DPO are checked here (in process, seconds);
pretrain, sft (through Ray Train: the reported bug) and rlhf re-run the finished artifact their own end-to-end test
already makes (tests/test_pretrain.py, test_sft.py, test_rlhf.py), with ``model_weights`` / ``weights_differ``."""

from __future__ import annotations

import json

import pytest

from pipelines.artifacts import ArtifactError, read_manifest
from pipelines.config import build_config
from tests.helpers import model_weights, planted_prefs, weights_differ

LR_FIRST, LR_SECOND = 1e-3, 3e-3


# ---- the lifecycle's guards (no Ray) --------------------------------------------------------------------------------
def test_begin_stage_checks_inputs_and_never_clears_what_is_not_a_genloop_artifact(tmp_path):
    from pipelines.lifecycle import begin_stage

    cfg = {"lr": 1.0}
    data = tmp_path / "data.jsonl"
    data.write_text("{}\n")
    with pytest.raises(FileNotFoundError, match="missing.jsonl does not exist"):
        begin_stage("sft", str(tmp_path / "out"), cfg, inputs=[str(tmp_path / "missing.jsonl")])
    assert not (tmp_path / "out").exists()  # nothing started

    # a folder with files but no manifest.json: refused, with or without --overwrite, its files untouched
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    for overwrite in (False, True):
        with pytest.raises(ArtifactError, match="not a genloop artifact"):
            begin_stage("sft", str(mine), cfg, inputs=[str(data)], overwrite=overwrite)
    assert (mine / "notes.txt").read_text() == "keep me" and not (mine / "manifest.json").exists()

    # a finished artifact: refused without --overwrite; with it, what the old run wrote is gone
    out = tmp_path / "out"
    run = begin_stage("sft", str(out), cfg, inputs=[str(data)])
    (out / "train_runs" / "sft" / "step_00000002").mkdir(parents=True)
    (out / "metrics.jsonl").write_text("{}\n")
    run.finish(counts={"rows": 1})
    assert read_manifest(str(out))["status"] == "finished"
    with pytest.raises(ArtifactError, match="already holds a finished sft artifact"):
        begin_stage("sft", str(out), cfg, inputs=[str(data)])
    assert (out / "metrics.jsonl").exists()
    begin_stage("sft", str(out), {"lr": 2.0}, inputs=[str(data)], overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json"]
    assert read_manifest(str(out))["status"] == "running" and read_manifest(str(out))["config"] == {"lr": 2.0}

    # an input inside --out (fine-tuning the artifact one overwrites) is never cleared
    (out / "model").mkdir()
    (out / "model" / "config.json").write_text("{}")
    with pytest.raises(ArtifactError, match="inside --out"):
        begin_stage("sft", str(out), cfg, inputs=[str(out / "model")], overwrite=True)
    assert (out / "model" / "config.json").exists()

    # another artifact nested in --out is never cleared either
    nested = out / "model" / "inner"
    begin_stage("data", str(nested), cfg).finish()
    with pytest.raises(ArtifactError, match="another genloop artifact"):
        begin_stage("sft", str(out), cfg, inputs=[str(data)], overwrite=True)
    assert (nested / "manifest.json").exists()


def test_an_unfinished_run_is_continued_by_a_resuming_stage_and_rebuilt_by_the_others(tmp_path):
    from pipelines.lifecycle import begin_stage, check_out

    out = tmp_path / "out"
    begin_stage("sft", str(out), {})  # a run that died: status running, a checkpoint left
    ckpt = out / "train_runs" / "sft" / "step_00000001"
    ckpt.mkdir(parents=True)
    assert check_out("sft", str(out), overwrite=False)["status"] == "running"
    assert begin_stage("sft", str(out), {}).cleared == 0 and ckpt.exists()  # resumes from it
    with pytest.raises(ArtifactError, match="unfinished sft artifact, not a data one"):
        check_out("data", str(out), overwrite=False)
    assert begin_stage("sft", str(out), {}, resume=False).cleared == 1 and not ckpt.exists()  # rebuilt
    with pytest.raises(ArtifactError, match="is a file"):
        check_out("sft", str(out / "manifest.json"), overwrite=True)


# ---- reward and DPO: --overwrite trains afresh, a plain re-run is refused ------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("stage", ["reward", "dpo"])
def test_preference_stages_overwrite(ray_session, tiny_checkpoint, tmp_path, stage):
    """In process: the single-process loop resumed a finished run's checkpoint the same way Ray Train's did."""

    if stage == "reward":
        from pipelines.prefs.reward import RewardConfig as Config
        from pipelines.prefs.reward import run as train
    else:
        from pipelines.prefs.dpo import DpoConfig as Config
        from pipelines.prefs.dpo import run as train
    data = planted_prefs(tmp_path / "prefs.jsonl", n=24)
    out = tmp_path / stage

    def run(lr: float, overwrite: bool) -> None:
        train(
            build_config(
                Config,
                stage,
                "tiny",
                {
                    "init_from": str(tiny_checkpoint),
                    "data": str(data),
                    "out": str(out),
                    "train.lr": lr,
                    "overwrite": overwrite,
                    "in_process": True,
                    "train.strategy": "none",
                    "train.micro_batch_size": 4,
                    "seq_len": 64,
                    "train.steps": 2,
                    "train.warmup_steps": 0,
                    "train.min_lr": 1e-4,
                    "train.log_every": 0,
                    "train.eval_every": 0,
                    "train.eval_batches": 0,
                    "train.ckpt_every": 0,
                },
            )
        )

    run(LR_FIRST, False)
    first = model_weights(out / "model")
    run(LR_SECOND, True)
    second = model_weights(out / "model")
    m = read_manifest(str(out))
    assert m["status"] == "finished" and m["config"]["train"]["lr"] == LR_SECOND
    assert weights_differ(first, second), "--overwrite with another lr gave the same weights: the old run resumed"
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2]  # the new run's history only
    with pytest.raises(ArtifactError, match=f"already holds a finished {stage} artifact"):
        run(LR_FIRST, False)
    assert not weights_differ(second, model_weights(out / "model"))  # the refused run changed nothing

"""`genloop pretrain`: the tokens -> (input_ids, labels) mapping, up-front errors on bad input, and a domain
fine-tune from a checkpoint end to end through the CLI (HF folder that transformers loads, metrics, manifest)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cluster.cli import main
from models.checkpoint import CheckpointError, resolve_checkpoint
from models.transformer import model_preset
from pipelines.config import ConfigError, build_config
from pipelines.pretrain.config import ModelSection, PretrainConfig, model_config
from pipelines.pretrain.stage import lm_rows, plan
from tests.helpers import make_dataset, stdlib_texts


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory, tiny_tokenizer):
    return make_dataset(tmp_path_factory.mktemp("data") / "ds", tiny_tokenizer, stdlib_texts(12), seq_len=32)


def test_lm_rows_shift_by_one_and_crop():
    batch = {"tokens": np.array([np.arange(6), np.arange(10, 16)], dtype=object)}
    out = lm_rows(batch, seq_len=4)
    assert out["input_ids"].tolist() == [[0, 1, 2, 3], [10, 11, 12, 13]]
    assert out["labels"].tolist() == [[1, 2, 3, 4], [11, 12, 13, 14]]


def test_fresh_model_fits_tokenizer_and_seq_len():
    cfg = model_config(PretrainConfig(model=ModelSection(preset="tiny", n_layers=1)), n_vocab=1030, seq_len=512)
    assert (cfg.vocab_size, cfg.n_layers, cfg.max_seq_len) == (1088, 1, 512)
    assert cfg.dim == model_preset("tiny").dim  # unset fields keep the preset's value


def test_model_is_a_typed_section_with_a_preset_shorthand():
    # the preset YAML says `model: tiny`; model.dim / --model override on top of it, in order
    cfg = build_config(PretrainConfig, "pretrain", "tiny", ["model.dim=128", "model.n_heads=4"])
    assert (cfg.model.preset, cfg.model.dim, cfg.model.n_heads) == ("tiny", 128, 4)
    mc = model_config(cfg, n_vocab=1030, seq_len=64)
    assert (mc.dim, mc.n_heads, mc.n_layers) == (128, 4, model_preset("tiny").n_layers)
    assert build_config(PretrainConfig, "pretrain", "tiny", ["model=demo", "model.n_layers=1"]).model == ModelSection(
        preset="demo", n_layers=1
    )
    assert build_config(PretrainConfig, "pretrain", "demo", {"model.preset": "tiny"}).model.preset == "tiny"
    with pytest.raises(ConfigError, match="unknown config key 'model.layers'.*n_layers"):
        build_config(PretrainConfig, "pretrain", "tiny", ["model.layers=1"])
    with pytest.raises(ConfigError, match="model.dim' must be an integer"):
        build_config(PretrainConfig, "pretrain", "tiny", ["model.dim=wide"])
    with pytest.raises(ConfigError, match="unknown model preset model.preset='huge'"):
        build_config(PretrainConfig, "pretrain", "tiny", ["model=huge"])
    with pytest.raises(ConfigError, match="did you mean train.lr"):
        build_config(PretrainConfig, "pretrain", "tiny", ["lr=3e-4"])
    # an inconsistent shape is refused when the model is planned, naming the keys
    with pytest.raises(ValueError, match="model.dim=100 must be divisible by model.n_heads=3"):
        model_config(build_config(PretrainConfig, "pretrain", "tiny", ["model.dim=100", "model.n_heads=3"]), 1030, 64)


def test_model_section_covers_every_architecture_field():
    """A ModelConfig field the section cannot override would be a key the README cannot promise."""
    from dataclasses import fields

    from models.transformer import ModelConfig

    # what only an imported checkpoint sets (its Hugging Face family: Qwen2's q/k/v bias, llama3 rope scaling); a
    # fresh model is genloop's Llama shape
    imported_only = {"family", "qkv_bias", "rope_scaling"}
    assert {f.name for f in fields(ModelSection)} - {"preset"} == {f.name for f in fields(ModelConfig)} - imported_only


def test_init_from_accepts_checkpoint_or_artifact_folder(tmp_path, tiny_checkpoint):
    assert resolve_checkpoint(str(tiny_checkpoint)) == str(tiny_checkpoint)
    with pytest.raises(CheckpointError, match="no checkpoint there"):
        resolve_checkpoint(str(tmp_path))


def _cli_error(capsys, argv) -> str:
    assert main(argv) == 1
    return capsys.readouterr().err.strip()


def test_bad_input_is_one_clear_line_before_anything_starts(tmp_path, capsys, tiny_data, tiny_checkpoint):
    from models.tokenizer import train

    out = str(tmp_path / "o")
    err = _cli_error(capsys, ["pretrain", "--config", "tiny", "--data", str(tmp_path), "--out", out])
    assert err.startswith("genloop pretrain: error: --data") and "not a genloop artifact" in err
    err = _cli_error(
        capsys, ["pretrain", "--config", "tiny", "--data", str(tiny_data), "--out", out, "--seq-len", "64"]
    )
    assert "seq_len=64 is longer than the blocks" in err and "\n" not in err
    other = make_dataset(tmp_path / "other", train(stdlib_texts(4), vocab_size=600), stdlib_texts(6), seq_len=32)
    err = _cli_error(
        capsys,
        ["pretrain", "--config", "tiny", "--data", str(other), "--out", out, "--init-from", str(tiny_checkpoint)],
    )
    assert "--init-from" in err and "re-tokenize the data" in err
    assert not (tmp_path / "o").exists()  # nothing was started


@pytest.mark.slow
def test_more_workers_than_the_cluster_has_fails_up_front(ray_session, tmp_path, capsys, tiny_data):
    err = _cli_error(
        capsys,
        [
            "pretrain",
            "--config",
            "tiny",
            "--data",
            str(tiny_data),
            "--out",
            str(tmp_path / "o"),
            "--num-workers",
            "64",
            "train.micro_batch_size=1",
        ],
    )
    assert "needs 64 CPUs but the Ray cluster has" in err and "--num-workers" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_domain_fine_tune_from_checkpoint_writes_a_model_transformers_loads(
    ray_session, tmp_path, capsys, tiny_data, tiny_checkpoint, monkeypatch
):
    import os

    from transformers import AutoModelForCausalLM

    from models.checkpoint import load_checkpoint

    # relative paths, as a user types them: Ray Train workers run elsewhere and must still find them
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "domain"
    argv = [
        "pretrain",
        "--config",
        "tiny",
        "--data",
        os.path.relpath(tiny_data),
        "--init-from",
        os.path.relpath(tiny_checkpoint),
        "--out",
        "domain",
        "--steps",
        "4",
        "train.lr=1e-4",
        "train.min_lr=1e-5",
        "train.eval_every=2",
        "train.ckpt_every=2",
    ]
    assert main(argv) == 0
    assert "pretrain: 4 steps" in capsys.readouterr().out
    m = json.loads((out / "manifest.json").read_text())
    assert m["status"] == "finished" and m["counts"]["steps"] == 4 and m["metrics"]["val_loss"] > 0
    assert [i["path"] for i in m["inputs"]] == [str(tiny_data), str(tiny_checkpoint)]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "val_loss" in r] == [2, 4]
    assert (out / "loss_curve.png").exists() and (out / "metrics.csv").exists()

    # the model changed (a little: lr 1e-4, 4 steps), and transformers computes the same logits as genloop
    start, _ = load_checkpoint(tiny_checkpoint)
    ours, tok = load_checkpoint(out / "model")
    assert not torch.equal(start.model.layers[0].mlp.up_proj.weight, ours.model.layers[0].mlp.up_proj.weight)
    hf = AutoModelForCausalLM.from_pretrained(out / "model").eval()
    ids = torch.tensor([tok.encode("def main():\n    return 0\n")])
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids), rtol=1e-4, atol=1e-4)

    # --init-from takes the artifact folder too
    assert plan(PretrainConfig(data=str(tiny_data), out=str(tmp_path / "x"), init_from=str(out))).init_from == str(
        out / "model"
    )
    # --overwrite at another lr trains afresh (nothing resumed from the finished run); a plain re-run is refused
    from tests.helpers import model_weights, weights_differ

    before = model_weights(out / "model")
    assert main(argv[:1] + ["--overwrite"] + argv[1:] + ["train.lr=1e-3"]) == 0
    after = model_weights(out / "model")
    assert weights_differ(before, after)
    assert json.loads((out / "manifest.json").read_text())["config"]["train"]["lr"] == 1e-3
    err = _cli_error(capsys, argv)
    assert "already holds a finished pretrain artifact" in err
    assert not weights_differ(after, model_weights(out / "model"))

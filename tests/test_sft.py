"""The sft stage end to end on the tiny preset: bad lines counted, LoRA trains only adapters, both exports agree, the
held-out answer loss falls; and the CLI path through Ray Train with sft-data / pretrain artifact folders."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from pipelines.artifacts import read_manifest
from pipelines.judge import writes_function

pytestmark = pytest.mark.slow

BAD_LINES = [
    '{"messages": [{"role": "user", "content": "no answer here"}]}',
    '{"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]}',
    '{"question": "wrong fields"}',
    "not json at all",
]


def _write_set(path, n: int, bad: bool = True) -> None:
    """n small code-writing conversations (a learnable pattern) plus the bad lines."""
    lines = []
    for i in range(n):
        name = f"f{i % 7}"
        lines.append(
            json.dumps(
                {
                    "prompt": f"Write `{name}` returning x plus {i % 5}.",
                    "response": f"def {name}(x):\n    return x + {i % 5}",
                    "meta": {"task": "write"},
                }
            )
        )
    if bad:
        lines += BAD_LINES
    path.write_text("\n".join(lines) + "\n")


def test_sft_lora_in_process(ray_session, tiny_checkpoint, tmp_path):
    from models.checkpoint import load_checkpoint
    from models.lora import LoraConfig, load_peft_adapter
    from pipelines.config import build_config
    from pipelines.sft.stage import SftConfig, run

    data = tmp_path / "sft.jsonl"
    _write_set(data, 48)
    shutil.copy(data, tmp_path / "sft.val.jsonl")  # held-out = the same pattern: its answer loss must fall
    cfg = build_config(
        SftConfig,
        "sft",
        "tiny",
        {
            "init_from": str(tiny_checkpoint),
            "data": str(data),
            "out": str(tmp_path / "out"),
            "in_process": True,
            "export": "both",
            "lora.rank": 8,
            "lora.alpha": 16,
            "train.steps": 40,
            "train.lr": 2e-2,
            "train.warmup_steps": 2,
            "train.eval_every": 20,
            "eval.prompts": 2,
            "eval.max_new_tokens": 12,
            "eval.step_prompts": 1,
        },
    )
    assert cfg.lora == LoraConfig(
        rank=8, alpha=16.0, dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]
    )
    res = run(cfg)

    m = read_manifest(str(tmp_path / "out"))
    assert m["status"] == "finished" and m["stage"] == "sft"
    c = m["counts"]
    assert c["lines"] == 52 and c["samples"] == 48
    assert c["bad_no_assistant_turn"] == c["bad_unknown_role"] == c["bad_missing_fields"] == c["bad_json"] == 1
    assert c["val_bad_json"] == 1
    assert res["heldout_answer_loss_after"] < res["heldout_answer_loss_before"] - 0.5
    # the parse rate is the share of the saved answers that define a function, before and after
    samples = [json.loads(l) for l in open(tmp_path / "out" / "samples.jsonl")]
    assert len(samples) == 2 and {"before", "after", "reference"} <= set(samples[0])
    assert res["parse_rate_after"] > res["parse_rate_before"]  # 0 -> 1 here: the pattern is learned
    for when in ("before", "after"):
        assert res[f"parse_rate_{when}"] == sum(writes_function(s[when]) for s in samples) / 2
    # per eval step: held-out answer loss (val_loss) and the parse rate of the step's generated answers
    steps = [json.loads(l) for l in open(tmp_path / "out" / "metrics.jsonl")]
    evals = [r for r in steps if "val_loss" in r]
    assert [r["step"] for r in evals] == [20, 40] and all("parse_rate" in r for r in evals)

    # only adapters trained: the merged export differs from the base exactly on LoRA targets ...
    base, _ = load_checkpoint(tiny_checkpoint)
    merged, _ = load_checkpoint(tmp_path / "out" / "model")
    bsd, msd = base.state_dict(), merged.state_dict()
    changed = {k for k in bsd if not torch.equal(bsd[k], msd[k])}
    assert changed and all(k.rsplit(".", 2)[-2] in cfg.lora.target_modules for k in changed)
    # ... and the PEFT adapter on the base model computes what the merged checkpoint computes
    load_peft_adapter(base, tmp_path / "out" / "adapter")
    x = torch.randint(0, 500, (2, 24))
    with torch.no_grad():
        assert torch.allclose(base(x), merged(x), atol=1e-4)


def test_sft_cli_ray_train(ray_session, tiny_checkpoint, tmp_path, capsys):
    """`genloop sft-data --out DIR` then `genloop sft --init-from PRETRAIN_ARTIFACT --data DIR` (Ray Train, DDP)."""
    from cluster.cli import main
    from pipelines.sft.data import train_path

    shutil.copytree(tiny_checkpoint, tmp_path / "pretrain" / "model")
    code = tmp_path / "code"
    code.mkdir()
    shutil.copy(__import__("base64").__file__, code / "b64.py")
    assert (
        main(
            [
                "sft-data",
                "--config",
                "tiny",
                "--from-code",
                str(code),
                "--out",
                str(tmp_path / "sd"),
                "val_fraction=0.3",
            ]
        )
        == 0
    )
    assert read_manifest(str(tmp_path / "sd"))["status"] == "finished"
    assert sum(1 for _ in open(train_path(str(tmp_path / "sd")))) > 0
    capsys.readouterr()
    argv = [
        "sft",
        "--config",
        "tiny",
        "--init-from",
        str(tmp_path / "pretrain"),
        "--data",
        str(tmp_path / "sd"),
        "--out",
        str(tmp_path / "sft"),
        "--steps",
        "6",
        "eval.prompts=2",
        "eval.max_new_tokens=8",
        "pack=false",
    ]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    m = read_manifest(str(tmp_path / "sft"))
    assert m["status"] == "finished" and m["config"]["pack"] is False and m["metrics"]["steps"] == 6
    assert out["heldout_answer_loss_after"] < out["heldout_answer_loss_before"]
    assert (tmp_path / "sft" / "model" / "config.json").exists()
    # --overwrite at another lr trains afresh: it once resumed the finished run's last checkpoint (same weights)
    from tests.helpers import model_weights, weights_differ

    before = model_weights(tmp_path / "sft" / "model")
    assert main(argv[:1] + ["--overwrite"] + argv[1:] + ["train.lr=3e-3"]) == 0
    after = model_weights(tmp_path / "sft" / "model")
    assert weights_differ(before, after)
    # a finished artifact is not overwritten without --overwrite; bad --data is one clear error line
    assert (
        main(
            [
                "sft",
                "--config",
                "tiny",
                "--init-from",
                str(tmp_path / "pretrain"),
                "--data",
                str(tmp_path / "sd"),
                "--out",
                str(tmp_path / "sft"),
            ]
        )
        == 1
    )
    assert not weights_differ(after, model_weights(tmp_path / "sft" / "model"))
    assert (
        main(
            [
                "sft",
                "--config",
                "tiny",
                "--init-from",
                str(tmp_path / "pretrain"),
                "--data",
                str(tmp_path / "missing.jsonl"),
                "--out",
                str(tmp_path / "sft2"),
            ]
        )
        == 1
    )
    assert "missing.jsonl" in capsys.readouterr().err

"""The alignment stages end to end on the tiny preset, real Ray (Train, Data, tasks) and real vLLM, no mocks:
reward (FSDP2 x2 on Ray Train) ranks planted preferences and transformers loads it with the same scores; DPO's
held-out preference accuracy rises; pref-data makes valid judge pairs from a policy's samples and merges human ones."""

from __future__ import annotations

import json
import math
import time

import pytest
import torch

from pipelines.config import build_config
from pipelines.judge import judge
from tests.helpers import planted_prefs, sft_data_folder

pytestmark = pytest.mark.slow


def test_reward_model_learns_planted_preferences_under_fsdp(ray_session, tiny_checkpoint, tmp_path):
    from transformers import AutoModelForSequenceClassification

    from models.scalar_model import load_scalar_model, sequence_scores
    from pipelines.prefs.reward import RewardConfig, run

    data = planted_prefs(tmp_path / "prefs.jsonl")
    cfg = build_config(
        RewardConfig,
        "reward",
        "tiny",
        {
            "init_from": str(tiny_checkpoint),
            "data": str(data),
            "out": str(tmp_path / "rm"),
            "train.strategy": "fsdp",
            "train.num_workers": 2,
            "train.micro_batch_size": 4,
        },
    )
    res = run(cfg)
    # a fresh small head scores both sides alike (loss ~ log 2); after training the planted order is learnt
    assert res["heldout_pairwise_accuracy"] >= 0.9 and res["counts"]["val_pairs"] >= 10
    assert res["heldout_loss"] < 0.5 * math.log(2) and res["heldout_mean_margin"] > 0.5
    assert res["counts"]["bad_not_json"] == 1 and res["counts"]["bad_missing_fields"] == 1
    assert len((tmp_path / "rm" / "quarantine.jsonl").read_text().splitlines()) == 2
    manifest = json.loads((tmp_path / "rm" / "manifest.json").read_text())
    assert manifest["metrics"]["heldout_pairwise_accuracy"] == res["heldout_pairwise_accuracy"]
    assert any("val_accuracy" in json.loads(line) for line in (tmp_path / "rm" / "metrics.jsonl").open())

    # transformers loads the exported folder and gives the same scores as genloop's own loader
    model_dir = tmp_path / "rm" / "model"
    ours, tok = load_scalar_model(model_dir)
    hf = AutoModelForSequenceClassification.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    ids = torch.tensor(
        [
            tok.encode("def f(x, y):\n    return x + y") + [tok.pad_id] * 3,
            tok.encode("def f(x, y):\n    return x * y") + [tok.pad_id] * 3,
        ]
    )
    with torch.no_grad():
        mine = sequence_scores(ours.eval()(ids), ids, tok.pad_id)
        theirs = hf(input_ids=ids).logits.squeeze(-1)
    torch.testing.assert_close(theirs, mine, atol=1e-4, rtol=1e-4)


def test_dpo_preference_accuracy_rises(ray_session, tiny_checkpoint, tmp_path):
    from pipelines.prefs.dpo import DpoConfig, run

    data = planted_prefs(tmp_path / "prefs.jsonl")
    cfg = build_config(
        DpoConfig, "dpo", "tiny", {"init_from": str(tiny_checkpoint), "data": str(data), "out": str(tmp_path / "dpo")}
    )
    res = run(cfg)
    # at the start the policy IS the reference: every implicit reward is 0, so no pair counts as preferred
    hist = [json.loads(line) for line in (tmp_path / "dpo" / "metrics.jsonl").open()]
    val_acc = [h["val_accuracy"] for h in hist if "val_accuracy" in h]
    assert val_acc[-1] >= 0.9 and res["heldout_preference_accuracy"] >= 0.9
    assert res["heldout_reward_margin"] > 0 and res["heldout_chosen_reward"] > res["heldout_rejected_reward"]
    assert res["heldout_logp_accuracy"] > res["heldout_logp_accuracy_before"]
    assert (tmp_path / "dpo" / "model" / "config.json").exists()  # an HF causal LM: serve / vLLM load it


def engine_processes() -> int:
    """vLLM engine-core processes alive on this machine (spawned engines name themselves VLLM::EngineCore)."""
    import psutil

    n = 0
    for p in psutil.process_iter(["name", "cmdline"]):
        try:
            if "VLLM::EngineCore" in (p.info["name"] or "") + " ".join(p.info["cmdline"] or []):
                n += 1
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return n


def test_pref_data_makes_valid_judge_pairs_and_merges_human_ones(ray_session, tiny_checkpoint, tmp_path):
    from pipelines.prefs.pairs import read_pairs
    from pipelines.prefs.pref_data import PrefDataConfig, run

    sft = sft_data_folder(tmp_path / "sftd")
    first = json.loads((sft / "train.jsonl").read_text().splitlines()[0])
    user, ref = first["messages"][0]["content"], first["messages"][1]["content"]
    human = tmp_path / "human.jsonl"
    human.write_text(
        "\n".join(
            [
                json.dumps(
                    {
                        "prompt": user,
                        "chosen": ref,
                        "rejected": "pass",
                        "messages": [{"role": "user", "content": user}],
                        "source": "user",
                    }
                ),
                json.dumps(
                    {"prompt": "Say hi", "chosen": "hi", "rejected": "bye", "messages": None, "source": "ratings"}
                ),
                "{oops",
            ]
        )
        + "\n"
    )
    cfg = build_config(
        PrefDataConfig,
        "pref-data",
        "tiny",
        {"policy": str(tiny_checkpoint), "prompts": str(sft), "out": str(tmp_path / "pd"), "human": str(human)},
    )
    engines_before = engine_processes()
    res = run(cfg)
    # the sampling task's engine went with it (an idle Ray worker once kept it: ~2 GB and a busy core)
    deadline = time.monotonic() + 30
    while engine_processes() > engines_before and time.monotonic() < deadline:
        time.sleep(0.5)
    assert engine_processes() <= engines_before
    c = res["counts"]
    assert c["prompts"] == 8 and c["skipped_not_code_writing"] == 1 and c["bad_prompt_not_json"] == 1
    assert c["samples"] == 8 * cfg.samples and c["pairs_human"] == 2 and c["bad_not_json"] == 1
    samples = [json.loads(line) for line in (tmp_path / "pd" / "samples.jsonl").open()]
    assert len(samples) == 8 and all(len(s["candidates"]) == cfg.samples + 1 for s in samples)
    for side, n in (("train", c["train_pairs"]), ("val", c["val_pairs"])):
        lines = [json.loads(line) for line in (tmp_path / "pd" / f"{side}.jsonl").open()]
        assert len(lines) == n
        for p in lines:
            if p["source"] == "judge":  # the judge's scores are real and the margin clear
                assert p["chosen_score"] == judge(p["prompt"], p["chosen"])
                assert p["rejected_score"] == judge(p["prompt"], p["rejected"])
                assert p["chosen_score"] - p["rejected_score"] >= cfg.min_margin
    judge_val = [json.loads(line) for line in (tmp_path / "pd" / "val.jsonl").open()]
    val_prompts = {json.loads(line)["messages"][0]["content"] for line in (sft / "val.jsonl").open()}
    assert {p["prompt"] for p in judge_val if p["source"] == "judge"} <= val_prompts  # held-out prompts stay out
    # what pref-data writes is what reward / dpo read, with nothing to quarantine
    from collections import Counter

    counts, quarantine = Counter(), []
    assert len(read_pairs(str(tmp_path / "pd" / "train.jsonl"), counts, quarantine)) == c["train_pairs"]
    assert not quarantine
    assert 0.0 <= res["policy_judge_mean_score"] <= 1.0 and c["pairs_judge"] > 0

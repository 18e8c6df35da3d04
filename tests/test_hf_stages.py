"""Every stage on a Hugging Face model genloop did not write (the session's small random Llama, `hf_checkpoint`,
laid out like SmolLM2: its own byte-level BPE, ChatML template with a default system prompt, pad = EOS): sft (full
and LoRA), reward, dpo, pref-data, rlhf (grpo, ppo) and eval run on it, and each export keeps the model's own
tokenizer files and chat template, so transformers and vLLM load it unchanged. After two SFT steps transformers'
greedy answer equals vLLM's on the export."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from pipelines.config import build_config
from tests.helpers import TOY_REWARD, planted_prefs, sft_data_folder

pytestmark = pytest.mark.slow

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def assert_keeps_tokenizer(src: Path, export: Path) -> None:
    """The export carries the source model's tokenizer files byte for byte, and no genloop tiktoken files."""
    for f in TOKENIZER_FILES:
        assert (export / f).read_bytes() == (src / f).read_bytes(), f
    assert not (export / "tokenizer_spec.json").exists()
    hf = json.loads((export / "config.json").read_text())
    assert hf["pad_token_id"] == 2 and hf["bos_token_id"] == 1 and 2 in hf["eos_token_id"]


def sft_rows(path: Path, n: int = 32) -> Path:
    with open(path, "w") as f:
        for i in range(n):
            f.write(
                json.dumps(
                    {
                        "prompt": f"Write `f{i % 7}` returning x plus {i % 5}.",
                        "response": f"def f{i % 7}(x):\n    return x + {i % 5}",
                        "meta": {"task": "write"},
                    }
                )
            )
            f.write("\n")
    return path


def hf_greedy(folder: Path, prompts: list[list[int]], n: int) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    outs = []
    for p in prompts:
        with torch.no_grad():
            x = torch.tensor([p])  # an explicit mask: pad (2) = <|im_end|> sits inside every chat prompt
            ids = model.generate(
                x,
                attention_mask=torch.ones_like(x),
                max_new_tokens=n,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=2,
            )
        outs.append(ids[0, len(p) :].tolist())
    return outs


def test_sft_full_two_steps_then_transformers_greedy_equals_vllm(ray_session, hf_checkpoint, tmp_path):
    from models.chat import ChatFormat, encode_prompt
    from models.checkpoint import load_tokenizer
    from models.engine import EngineConfig
    from pipelines.rlhf.rollout import RolloutWorker
    from pipelines.sft.stage import SftConfig, run

    data = sft_rows(tmp_path / "sft.jsonl")
    shutil.copy(data, tmp_path / "sft.val.jsonl")
    cfg = build_config(
        SftConfig,
        "sft",
        "tiny",
        {
            "init_from": str(hf_checkpoint),
            "data": str(data),
            "out": str(tmp_path / "out"),
            "in_process": True,
            "train.steps": 2,
            "train.eval_every": 2,
            "eval.prompts": 2,
            "eval.max_new_tokens": 8,
        },
    )
    res = run(cfg)
    assert res["heldout_answer_loss_after"] < res["heldout_answer_loss_before"]
    export = tmp_path / "out" / "model"
    assert_keeps_tokenizer(hf_checkpoint, export)
    # `genloop deploy` takes the export in place of the served import (config.json written anew, same network)...
    from serve.versions import incompatibilities

    assert incompatibilities(hf_checkpoint, export) == []
    other = tmp_path / "other_tokenizer"  # ...but never one whose tokenizer or chat template differs
    shutil.copytree(export, other)
    (other / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    assert incompatibilities(hf_checkpoint, other) == [
        "chat_template.jinja differs (another tokenizer or chat template)"
    ]
    samples = [json.loads(line) for line in open(tmp_path / "out" / "samples.jsonl")]
    assert len(samples) == 2

    tok, fmt = load_tokenizer(export), ChatFormat.from_checkpoint(export)
    prompts = [
        encode_prompt(tok, fmt, [{"role": "user", "content": q}])
        for q in ("Write `f3` returning x plus 2.", "def hello(name):", "Grüße 🤖")
    ]
    worker = RolloutWorker(str(export), EngineConfig(max_model_len=256, max_num_seqs=4), [])
    vllm_out = worker.greedy(prompts, 16)
    del worker
    assert hf_greedy(export, prompts, 16) == [list(o) for o in vllm_out]


def test_sft_lora_on_hf_names(ray_session, hf_checkpoint, tmp_path):
    from models.checkpoint import load_checkpoint
    from models.lora import load_peft_adapter
    from pipelines.sft.stage import SftConfig, run

    data = sft_rows(tmp_path / "sft.jsonl")
    cfg = build_config(
        SftConfig,
        "sft",
        "tiny",
        {
            "init_from": str(hf_checkpoint),
            "data": str(data),
            "out": str(tmp_path / "out"),
            "in_process": True,
            "export": "both",
            "lora.rank": 4,
            "lora.alpha": 8,
            "train.steps": 3,
            "train.lr": 2e-2,
            "eval.prompts": 1,
            "eval.max_new_tokens": 4,
            "lora.target_modules": ["q_proj", "v_proj", "gate_proj"],
        },
    )
    run(cfg)
    assert_keeps_tokenizer(hf_checkpoint, tmp_path / "out" / "model")
    base, _ = load_checkpoint(hf_checkpoint)
    merged, _ = load_checkpoint(tmp_path / "out" / "model")
    bsd, msd = base.state_dict(), merged.state_dict()
    changed = {k.rsplit(".", 2)[-2] for k in bsd if not torch.equal(bsd[k], msd[k])}
    assert changed == {"q_proj", "v_proj", "gate_proj"}
    load_peft_adapter(base, tmp_path / "out" / "adapter")
    x = torch.randint(0, 1024, (2, 24))
    with torch.no_grad():
        assert torch.allclose(base(x), merged(x), atol=1e-4)


def test_reward_and_dpo_on_hf_model(ray_session, hf_checkpoint, tmp_path):
    from transformers import AutoModelForSequenceClassification

    from models.scalar_model import load_scalar_model, sequence_scores
    from pipelines.prefs import dpo, reward

    data = planted_prefs(tmp_path / "prefs.jsonl")
    res = reward.run(
        build_config(
            reward.RewardConfig,
            "reward",
            "tiny",
            {"init_from": str(hf_checkpoint), "data": str(data), "out": str(tmp_path / "rm"), "in_process": True},
        )
    )
    assert res["heldout_pairwise_accuracy"] >= 0.8
    model_dir = tmp_path / "rm" / "model"
    assert_keeps_tokenizer(hf_checkpoint, model_dir)
    ours, tok = load_scalar_model(model_dir)
    hf = AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.tensor(
        [
            tok.encode("def f(x, y):\n    return x + y") + [tok.pad_id] * 3,
            tok.encode("def f(x, y):\n    return x * y") + [tok.pad_id] * 3,
        ]
    )
    with torch.no_grad():
        torch.testing.assert_close(
            hf(input_ids=ids).logits.squeeze(-1),
            sequence_scores(ours.eval()(ids), ids, tok.pad_id),
            atol=1e-4,
            rtol=1e-4,
        )

    res = dpo.run(
        build_config(
            dpo.DpoConfig,
            "dpo",
            "tiny",
            {"init_from": str(hf_checkpoint), "data": str(data), "out": str(tmp_path / "dpo"), "in_process": True},
        )
    )
    assert res["heldout_preference_accuracy"] >= 0.8
    assert_keeps_tokenizer(hf_checkpoint, tmp_path / "dpo" / "model")


def test_pref_data_rlhf_and_eval_on_hf_model(ray_session, hf_checkpoint, tmp_path):
    """pref-data samples the HF policy through vLLM; rlhf grpo then ppo (two rollout engines' worth of work in one
    engine) and eval run on it."""
    from cluster.cli import main
    from pipelines.config import apply_overrides, from_dict, load_yaml, section_for
    from pipelines.prefs.pref_data import PrefDataConfig
    from pipelines.prefs.pref_data import run as pref_data
    from pipelines.rlhf.config import RlhfConfig
    from pipelines.rlhf.stage import plan, start_engines
    from pipelines.rlhf.stage import run as rlhf

    sft = sft_data_folder(tmp_path / "sftd")
    res = pref_data(
        build_config(
            PrefDataConfig,
            "pref-data",
            "tiny",
            {"policy": str(hf_checkpoint), "prompts": str(sft), "out": str(tmp_path / "pd"), "max_new_tokens": 12},
        )
    )
    assert res["counts"]["samples"] == 8 * 4

    (tmp_path / "toy_reward.py").write_text(TOY_REWARD)

    def config(algo: str) -> RlhfConfig:
        base = section_for(load_yaml("tiny"), "rlhf", RlhfConfig)
        base.update(
            policy=str(hf_checkpoint),
            prompts=str(sft / "train.jsonl"),
            out=str(tmp_path / algo),
            reward=f"fn:{tmp_path / 'toy_reward.py'}:whitespace",
        )
        return from_dict(RlhfConfig, apply_overrides(base, [f"algo={algo}", "iterations=2", "train.ckpt_every=0"]))

    actors = start_engines(config("grpo"), plan(config("grpo")), use_gpu=False)
    try:
        for algo in ("grpo", "ppo"):
            out = rlhf(config(algo), engines=actors)
            assert len(out.history) == 2
            assert_keeps_tokenizer(hf_checkpoint, tmp_path / algo / "model")
    finally:
        for a in actors:
            ray_session.kill(a)

    assert (
        main(
            [
                "eval",
                "--policy",
                str(tmp_path / "grpo"),
                "--prompts",
                str(sft),
                "--n-prompts",
                "2",
                "--max-new-tokens",
                "8",
                "--reference",
                str(hf_checkpoint),
            ]
        )
        == 0
    )

"""LoRA: only adapter weights train; the merged export equals base + scaling * B A; PEFT export has PEFT's names."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from models.checkpoint import load_checkpoint, save_checkpoint
from models.lora import LoraConfig, LoraLinear, apply_lora, merge_lora, merged_state_dict, save_peft_adapter


def _batch(n_vocab: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, n_vocab, (2, 16), generator=g)


def test_lora_starts_as_identity_and_trains_only_adapters(tiny_checkpoint):
    model, tok = load_checkpoint(tiny_checkpoint)
    x = _batch(tok.n_vocab)
    base_logits = model(x).detach()
    base_sd = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = LoraConfig(rank=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    wrapped = apply_lora(model, cfg)
    assert len(wrapped) == 3 * model.cfg.n_layers
    assert torch.allclose(model(x), base_logits, atol=1e-6)  # B = 0: no change before training
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A" in n or ".lora_B" in n for n in trainable)
    assert len(trainable) == 2 * len(wrapped)

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        loss = torch.nn.functional.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    sd = model.state_dict()
    for k, v in base_sd.items():  # every base weight is bit-identical after training
        name = k
        if k not in sd:
            name = k.rsplit(".", 1)[0] + ".base." + k.rsplit(".", 1)[1]
        assert torch.equal(sd[name], v), k
    assert any(m.lora_B.abs().sum() > 0 for m in model.modules() if isinstance(m, LoraLinear))


def test_merged_export_equals_base_plus_BA(tiny_checkpoint, tmp_path):
    model, tok = load_checkpoint(tiny_checkpoint)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = LoraConfig(rank=2, alpha=6, target_modules=["q_proj", "o_proj"])
    apply_lora(model, cfg)
    torch.manual_seed(1)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, LoraLinear)}
    for m in layers.values():
        torch.nn.init.normal_(m.lora_B, std=0.05)
    x = _batch(tok.n_vocab, 1)
    with torch.no_grad():
        adapted_logits = model(x)
    merged = merged_state_dict(model)
    assert set(merged) == set(base)
    for name, m in layers.items():
        want = base[name + ".weight"] + (cfg.alpha / cfg.rank) * m.lora_B.detach() @ m.lora_A.detach()
        assert torch.allclose(merged[name + ".weight"], want, atol=1e-7)
    unchanged = [k for k in base if not any(k == n + ".weight" for n in layers)]
    assert all(torch.equal(merged[k], base[k]) for k in unchanged)

    # the merged checkpoint is a plain HF folder computing what the adapted model computes
    save_checkpoint(model, tok, tmp_path / "merged", state_dict=merged)
    reloaded, _ = load_checkpoint(tmp_path / "merged")
    with torch.no_grad():
        assert torch.allclose(reloaded(x), adapted_logits, atol=1e-4)
    # in-place merge gives the same module structure and numbers
    merge_lora(model)
    assert not any(isinstance(m, LoraLinear) for m in model.modules())
    with torch.no_grad():
        assert torch.allclose(model(x), adapted_logits, atol=1e-4)


def test_peft_adapter_export(tiny_checkpoint, tmp_path):
    model, _ = load_checkpoint(tiny_checkpoint)
    cfg = LoraConfig(rank=4, alpha=16, target_modules=["q_proj", "v_proj"])
    apply_lora(model, cfg)
    out = save_peft_adapter(model, cfg, tmp_path / "adapter", base_model=str(tiny_checkpoint))
    conf = json.loads((out / "adapter_config.json").read_text())
    assert conf["peft_type"] == "LORA" and conf["r"] == 4 and conf["lora_alpha"] == 16
    assert conf["target_modules"] == ["q_proj", "v_proj"]
    sd = load_file(str(out / "adapter_model.safetensors"))
    a = sd["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
    b = sd["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"]
    assert a.shape == (4, model.cfg.dim)
    assert b.shape == (model.cfg.n_kv_heads * model.cfg.head_dim, 4)
    assert len(sd) == 2 * 2 * model.cfg.n_layers

    # round trip: a fresh base model + the adapter folder computes what the adapted model computes
    from models.lora import load_peft_adapter

    for m in model.modules():
        if isinstance(m, LoraLinear):
            torch.nn.init.normal_(m.lora_B, std=0.05)
    save_peft_adapter(model, cfg, tmp_path / "adapter2")
    fresh, tok = load_checkpoint(tiny_checkpoint)
    load_peft_adapter(fresh, tmp_path / "adapter2")
    x = _batch(tok.n_vocab, 2)
    with torch.no_grad():
        assert torch.allclose(fresh(x), model(x), atol=1e-6)
        assert not torch.allclose(fresh(x), load_checkpoint(tiny_checkpoint)[0](x), atol=1e-3)


def test_lora_bad_targets(tiny_checkpoint):
    model, _ = load_checkpoint(tiny_checkpoint)
    with pytest.raises(ValueError, match="match no Linear layer; choose from"):
        apply_lora(model, LoraConfig(rank=2, target_modules=["qkv"]))


def test_peft_loads_the_adapter_and_matches_the_merged_checkpoint(tiny_checkpoint, tmp_path):
    """The adapter folder is a real PEFT adapter: ``PeftModel.from_pretrained`` on the base checkpoint (loaded by
    transformers) computes the logits of genloop's merged checkpoint."""
    peft = pytest.importorskip("peft", reason="peft (test extra) checks the adapter format")
    from transformers import AutoModelForCausalLM

    model, tok = load_checkpoint(tiny_checkpoint)
    cfg = LoraConfig(rank=4, alpha=8, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"])
    apply_lora(model, cfg)
    torch.manual_seed(3)
    for m in model.modules():
        if isinstance(m, LoraLinear):
            torch.nn.init.normal_(m.lora_B, std=0.05)
    save_peft_adapter(model, cfg, tmp_path / "adapter", base_model=str(tiny_checkpoint))
    save_checkpoint(model, tok, tmp_path / "merged", state_dict=merged_state_dict(model))

    base = AutoModelForCausalLM.from_pretrained(str(tiny_checkpoint), torch_dtype=torch.float32)
    with_adapter = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), torch_dtype=torch.float32).eval()
    x = _batch(tok.n_vocab, 4)
    with torch.no_grad():
        got, want = with_adapter(x).logits, merged(x).logits
        plain = load_checkpoint(tiny_checkpoint)[0](x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(got, plain, atol=1e-3)  # the adapter changes the model: the check has teeth

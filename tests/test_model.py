import json

import pytest
import torch

from models.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from models.transformer import MODEL_PRESETS, KVCache, ModelConfig, Transformer, generate, model_preset


def tiny_cfg(**kw) -> ModelConfig:
    return ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=96, vocab_size=128, max_seq_len=64, **kw)


def test_forward_shapes_and_causality():
    torch.manual_seed(0)
    m = Transformer(tiny_cfg())
    x = torch.randint(0, 128, (2, 16))
    logits = m(x)
    assert logits.shape == (2, 16, 128)
    # changing a later token never changes earlier logits
    y = x.clone()
    y[:, 10] = (y[:, 10] + 1) % 128
    assert torch.allclose(m(y)[:, :10], logits[:, :10], atol=1e-6)
    assert not torch.allclose(m(y)[:, 10:], logits[:, 10:])


def test_packed_samples_equal_separate_samples():
    """doc_ids + restarting position_ids make a packed row compute exactly what each sample alone computes."""
    torch.manual_seed(0)
    m = Transformer(tiny_cfg())
    a, b = torch.randint(0, 128, (1, 7)), torch.randint(0, 128, (1, 9))
    packed = torch.cat([a, b], 1)
    pos = torch.cat([torch.arange(7), torch.arange(9)])[None]
    doc = torch.tensor([[0] * 7 + [1] * 9])
    out = m(packed, position_ids=pos, doc_ids=doc)
    assert torch.allclose(out[:, :7], m(a), atol=1e-5)
    assert torch.allclose(out[:, 7:], m(b), atol=1e-5)


def test_tied_embeddings_share_storage_and_param_count():
    m = Transformer(tiny_cfg())
    assert m.lm_head.weight is m.model.embed_tokens.weight
    assert sum(p.numel() for p in m.parameters()) == m.cfg.num_params()
    untied = Transformer(tiny_cfg(tie_embeddings=False))
    assert sum(p.numel() for p in untied.parameters()) == untied.cfg.num_params()


def test_presets_are_valid_and_sized():
    assert set(MODEL_PRESETS) >= {"tiny", "demo", "gpt2-124m", "llama-1b", "llama-8b"}
    assert 1.1e9 < model_preset("llama-1b").num_params() < 1.4e9
    assert 7.5e9 < model_preset("llama-8b").num_params() < 8.5e9
    assert 110e6 < model_preset("gpt2-124m").num_params() < 140e6
    with pytest.raises(ValueError, match="unknown model preset 'giant'"):
        model_preset("giant")
    with pytest.raises(ValueError, match="divisible"):
        Transformer(ModelConfig(dim=65, n_heads=4, vocab_size=64))


def test_checkpoint_round_trip(tmp_path, tiny_checkpoint):
    m, tok = load_checkpoint(tiny_checkpoint)
    x = torch.randint(0, tok.n_vocab, (2, 12))
    save_checkpoint(m, tok, tmp_path / "again")
    m2, _ = load_checkpoint(tmp_path / "again")
    assert torch.equal(m(x), m2(x))
    files = {p.name for p in tiny_checkpoint.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
        "tokenizer.tiktoken",
        "tokenizer_spec.json",
    } <= files
    assert json.loads((tiny_checkpoint / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]


def test_transformers_gives_the_same_logits(tiny_checkpoint):
    from transformers import AutoModelForCausalLM

    ours, tok = load_checkpoint(tiny_checkpoint)
    hf = AutoModelForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32).eval()
    x = torch.tensor([tok.encode("def main():\n    return 0  # héllo 🙂")])
    with torch.no_grad():
        diff = (hf(x).logits - ours(x)).abs().max().item()
    assert diff < 1e-4, diff


def test_transformers_tokenizer_gives_the_same_ids_and_chat_template(tiny_checkpoint):
    from transformers import AutoTokenizer

    from tests.helpers import VARIED

    _, tok = load_checkpoint(tiny_checkpoint)
    hf = AutoTokenizer.from_pretrained(tiny_checkpoint)
    for text in VARIED:
        assert hf.encode(text, add_special_tokens=False) == tok.encode(text, allow_special=True), text
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    rendered = hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert (
        rendered == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_bad_checkpoints_are_one_line_errors(tmp_path, tiny_checkpoint):
    import shutil

    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing")
    broken = tmp_path / "broken"
    shutil.copytree(tiny_checkpoint, broken)
    (broken / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="model.safetensors is missing or corrupt"):
        load_checkpoint(broken)
    (broken / "config.json").write_text("{")
    with pytest.raises(CheckpointError, match="config.json is corrupt"):
        load_checkpoint(broken)
    mismatch = tmp_path / "mismatch"
    shutil.copytree(tiny_checkpoint, mismatch)
    cfg = json.loads((mismatch / "config.json").read_text())
    cfg["vocab_size"] = 512
    (mismatch / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="tokenizer has 1024 tokens but config.json says vocab_size=512"):
        load_checkpoint(mismatch)


def test_greedy_generate_stops_on_stop_id(tiny_checkpoint):
    m, tok = load_checkpoint(tiny_checkpoint)
    prompt = tok.encode("import os\n")
    out = generate(m, prompt, 8)
    assert len(out) == 8
    first = out[0]
    assert generate(m, prompt, 8, stop_ids=(first,)) == [first]


def _greedy_full(model, prompt: list[int], n: int) -> list[int]:
    """Reference greedy decoding: the whole context re-run for every new token (no cache)."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt) :]


def test_kv_cache_forward_matches_full_forward(tiny_checkpoint):
    """Logits of a prompt fed in three pieces through one KVCache equal those of one full forward."""
    m, tok = load_checkpoint(tiny_checkpoint)
    ids = torch.tensor([tok.encode("def add(a, b):\n    return a + b\n\nprint(add(1, 2))\n")])  # (1, T)
    T = ids.shape[1]
    with torch.no_grad():
        full = m(ids)
        cache = KVCache(m.cfg.n_layers)
        pieces = [m(ids[:, :5], cache=cache), m(ids[:, 5:6], cache=cache), m(ids[:, 6:], cache=cache)]
    assert len(cache) == T
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-4, atol=1e-4)


def test_cached_generate_equals_full_recompute_also_with_lora(tiny_checkpoint):
    from models.lora import LoraConfig, LoraLinear, apply_lora

    model, tok = load_checkpoint(tiny_checkpoint)
    prompts = [tok.encode("def add(a, b):\n    return"), [tok.im_start_id] + tok.encode("user\nhello")]
    for p in prompts:
        want = _greedy_full(model, p, 20)
        assert generate(model, p, 20) == want
        assert generate(model, p, 20, stop_ids=(want[5],)) == want[: want.index(want[5]) + 1]
    apply_lora(model, LoraConfig(rank=2, target_modules=["q_proj", "v_proj", "up_proj"]))
    for mod in model.modules():
        if isinstance(mod, LoraLinear):
            torch.nn.init.normal_(mod.lora_B, std=0.5)
    assert generate(model, prompts[0], 20) == _greedy_full(model, prompts[0], 20)
    # never runs past the context; a prompt that fills it is refused
    assert len(generate(model, list(range(model.cfg.max_seq_len - 3)), 20)) == 3
    with pytest.raises(ValueError, match="no room"):
        generate(model, list(range(model.cfg.max_seq_len)), 4)

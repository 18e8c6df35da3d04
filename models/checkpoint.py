"""Hugging Face–format checkpoints: what every stage after training reads, and what transformers and vLLM load as is.

A folder holds ``config.json`` (LlamaForCausalLM), ``model.safetensors``, ``tokenizer.json`` +
``tokenizer_config.json`` (with the chat template), ``generation_config.json``, and genloop's own tokenizer files
(``tokenizer.tiktoken`` + ``tokenizer_spec.json``) so that genloop encodes through tiktoken.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from models.tokenizer import CHAT_TEMPLATE, ENDOFTEXT, IM_END, PAD, Tokenizer, TokenizerError, to_hf_tokenizer_json
from models.transformer import ModelConfig, Transformer

log = logging.getLogger(__name__)

WEIGHTS = "model.safetensors"


class CheckpointError(ValueError):
    """A missing, corrupt or inconsistent checkpoint; the message names the file and what to do."""


def hf_config(cfg: ModelConfig, tok: Tokenizer, dtype: str = "float32") -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.ffn_hidden,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.max_seq_len,
        "rope_theta": cfg.rope_theta,
        "rms_norm_eps": cfg.norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "initializer_range": cfg.init_std,
        "bos_token_id": tok.eot_id,
        "eos_token_id": [tok.eot_id, tok.im_end_id],
        "pad_token_id": tok.pad_id,
        "torch_dtype": dtype,
        "use_cache": True,
    }


def model_config_from_hf(hf: dict) -> ModelConfig:
    return ModelConfig(
        dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"], n_heads=hf["num_attention_heads"],
        n_kv_heads=hf.get("num_key_value_heads", hf["num_attention_heads"]), ffn_hidden=hf["intermediate_size"],
        vocab_size=hf["vocab_size"], max_seq_len=hf.get("max_position_embeddings", 2048),
        rope_theta=float(hf.get("rope_theta", 10000.0)), norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)), init_std=float(hf.get("initializer_range", 0.02)),
    )


def save_tokenizer_files(tok: Tokenizer, out: Path, max_len: int) -> None:
    """tiktoken files for genloop plus the Hugging Face tokenizer files with the chat template."""
    tok.save(out)
    (out / "tokenizer.json").write_text(to_hf_tokenizer_json(tok))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": CHAT_TEMPLATE,
        "bos_token": None,
        "eos_token": IM_END,
        "pad_token": PAD,
        "unk_token": None,
        "additional_special_tokens": [ENDOFTEXT],
        "model_max_length": max_len,
        "clean_up_tokenization_spaces": False,
        "add_bos_token": False,
        "add_eos_token": False,
    }, indent=2) + "\n")


def save_checkpoint(model: Transformer, tok: Tokenizer, out: str | Path, state_dict: dict | None = None,
                    generation: dict | None = None) -> Path:
    """Write a Hugging Face–format folder. ``state_dict`` overrides the module's (e.g. gathered from FSDP)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = model.cfg
    if tok.n_vocab > cfg.vocab_size:
        raise CheckpointError(f"tokenizer {tok.name} has {tok.n_vocab} tokens but the model only {cfg.vocab_size}")
    sd = state_dict if state_dict is not None else model.state_dict()
    sd = {k: v.detach().to("cpu").contiguous() for k, v in sd.items()}
    if cfg.tie_embeddings:
        sd.pop("lm_head.weight", None)
    dtype = str(next(iter(sd.values())).dtype).removeprefix("torch.")
    save_file(sd, str(out / WEIGHTS), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(hf_config(cfg, tok, dtype), indent=2) + "\n")
    gen = {"bos_token_id": tok.eot_id, "eos_token_id": [tok.eot_id, tok.im_end_id], "pad_token_id": tok.pad_id,
           "do_sample": True, "temperature": 0.8, "top_k": 50, **(generation or {})}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    save_tokenizer_files(tok, out, cfg.max_seq_len)
    log.info("saved checkpoint %s (%.2fM params)", out, cfg.num_params() / 1e6)
    return out


def resolve_checkpoint(path: str | Path) -> str:
    """A checkpoint folder: ``path`` itself, or ``<artifact>/model`` (what pretrain and sft write)."""
    p = Path(path)
    if (p / "config.json").exists():
        return str(p)
    if (p / "model" / "config.json").exists():
        return str(p / "model")
    raise CheckpointError(f"{path}: no checkpoint there (expected config.json in it or in model/); "
                          "pass a model folder a genloop training stage wrote")


def load_config(path: str | Path) -> ModelConfig:
    cfg_path = Path(path) / "config.json"
    if not cfg_path.exists():
        raise CheckpointError(f"{path} is not a checkpoint: no config.json (point at a folder a genloop stage wrote)")
    try:
        return model_config_from_hf(json.loads(cfg_path.read_text()))
    except (json.JSONDecodeError, KeyError) as e:
        raise CheckpointError(f"{cfg_path} is corrupt or not a Llama config ({e!r}); re-export the checkpoint") from None


def load_tokenizer(path: str | Path) -> Tokenizer:
    try:
        return Tokenizer.load(path)
    except TokenizerError as e:
        raise CheckpointError(f"checkpoint {path}: {e}") from None


def load_weights(path: Path, model_cls: type[nn.Module], cfg: ModelConfig, device: str | torch.device = "cpu",
                 skip: set[str] | frozenset[str] = frozenset()) -> nn.Module:
    """``model_cls(cfg)`` built on ``device`` without initialising it, filled from ``path/model.safetensors``; names in
    ``skip`` (a tied lm_head) are neither loaded nor required. A missing or corrupt file, or names that do not match
    the config, are CheckpointErrors."""
    try:
        sd = load_file(str(path / WEIGHTS))
    except (SafetensorError, FileNotFoundError, OSError) as e:
        raise CheckpointError(f"{path / WEIGHTS} is missing or corrupt ({e}); re-export the model") from None
    for k in skip:
        sd.pop(k, None)
    with torch.device("meta"):
        model = model_cls(cfg)
    model = model.to_empty(device=device)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if k not in skip]
    if missing or unexpected:
        raise CheckpointError(f"{path / WEIGHTS} does not match config.json: missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]}")
    return model


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu",
                    dtype: torch.dtype | None = None) -> tuple[Transformer, Tokenizer]:
    """(model, tokenizer) from a folder written by ``save_checkpoint`` (or any matching Llama HF folder)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist; pass the folder a training stage wrote")
    cfg = load_config(path)
    tok = load_tokenizer(path)
    if tok.n_vocab > cfg.vocab_size:
        raise CheckpointError(
            f"{path}: tokenizer has {tok.n_vocab} tokens but config.json says vocab_size={cfg.vocab_size}; "
            "the tokenizer files do not belong to these weights"
        )
    tied = {"lm_head.weight"} if cfg.tie_embeddings else set()
    model = load_weights(path, Transformer, cfg, device, skip=tied)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    if dtype is not None:
        model = model.to(dtype)
    return model, tok

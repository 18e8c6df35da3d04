"""Hugging Face–format checkpoints: what every stage after training reads, and what transformers and vLLM load as is.

A folder genloop writes holds ``config.json`` (LlamaForCausalLM), ``model.safetensors``, ``tokenizer.json`` +
``tokenizer_config.json`` (with the chat template), ``generation_config.json``, and genloop's own tokenizer files
(``tokenizer.tiktoken`` + ``tokenizer_spec.json``) so that genloop encodes through tiktoken.

Any Hugging Face folder of a supported architecture loads too (``SUPPORTED``: Llama 2/3.x with ``llama3`` rope
scaling, SmolLM, TinyLlama, Qwen2; ``model.safetensors`` or shards with ``model.safetensors.index.json``), with the
model's own tokenizer (``models.hf_tokenizer.HFTokenizer``). ``check_supported`` refuses, before any weight is read,
an architecture or a config field genloop would otherwise ignore (sliding window, another rope type, ...).
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
WEIGHTS_INDEX = "model.safetensors.index.json"

# architectures genloop runs, by config.json's "architectures" -> model family (ModelConfig.family)
SUPPORTED = {
    "LlamaForCausalLM": "llama",
    "LlamaForSequenceClassification": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen2ForSequenceClassification": "qwen2",
}
CAUSAL_LM = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
ROPE_TYPES = ("default", "llama3")
LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


class CheckpointError(ValueError):
    """A missing, corrupt or inconsistent checkpoint; the message names the file and what to do."""


class UnsupportedModelError(CheckpointError):
    """A checkpoint of an architecture, or with a config field, genloop does not implement."""


def rope_from_hf(hf: dict, where: str = "config.json") -> tuple[float, dict[str, float] | None]:
    """(rope_theta, llama3 scaling or None). transformers 5 writes every RoPE setting under ``rope_parameters``;
    older configs have a top-level ``rope_theta`` and ``rope_scaling``: the new key is read first."""
    params = hf.get("rope_parameters")
    if params is not None and not isinstance(params, dict):
        raise UnsupportedModelError(f"{where}: rope_parameters={params!r} is not a mapping")
    if params and all(isinstance(v, dict) for v in params.values()):
        raise UnsupportedModelError(
            f"{where}: per-layer-type rope_parameters ({', '.join(params)}) are not "
            "supported; genloop runs one RoPE for every layer"
        )
    params = dict(params or hf.get("rope_scaling") or {})
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise UnsupportedModelError(
            f"{where}: rope type {rope_type!r} is not supported (genloop implements "
            f"{', '.join(ROPE_TYPES)}); pick a model without it"
        )
    if float(params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))) != 1.0:
        raise UnsupportedModelError(f"{where}: partial_rotary_factor != 1 is not supported")
    if rope_type == "default":
        return theta, None
    scaling = {k: params.get(k) for k in LLAMA3_KEYS}
    if scaling["original_max_position_embeddings"] is None:  # as transformers' standardize_rope_params
        scaling["original_max_position_embeddings"] = hf.get(
            "original_max_position_embeddings", hf.get("max_position_embeddings")
        )
    missing = [k for k, v in scaling.items() if v is None]
    if missing:
        raise UnsupportedModelError(f"{where}: llama3 rope scaling lacks {', '.join(missing)}")
    scaling = {k: float(v) for k, v in scaling.items()}
    scaling["original_max_position_embeddings"] = int(scaling["original_max_position_embeddings"])  # a length
    return theta, scaling


def check_supported(hf: dict, where: str = "config.json") -> str:
    """The model family of a Hugging Face ``config.json`` genloop runs exactly as transformers does; anything else
    (another architecture, sliding-window attention, another rope type, biases or activations genloop's transformer
    lacks) is an ``UnsupportedModelError`` naming the field."""
    archs = hf.get("architectures") or []
    model_type = hf.get("model_type", "llama")
    bad = [a for a in archs if a not in SUPPORTED]
    if bad or model_type not in CAUSAL_LM:
        raise UnsupportedModelError(
            f"{where}: architecture {', '.join(bad) or model_type!r} is not supported; genloop runs "
            f"{', '.join(SUPPORTED)} (Llama 2/3.x, SmolLM, TinyLlama, Qwen2)"
        )
    family = SUPPORTED[archs[0]] if archs else model_type
    if family != model_type:
        raise UnsupportedModelError(f"{where}: architectures {archs} do not match model_type {model_type!r}")
    n_layers = hf.get("num_hidden_layers", 0)
    if family == "qwen2":
        use_sw = bool(hf.get("use_sliding_window", False))
        layer_types = hf.get("layer_types") or [
            "sliding_attention"
            if use_sw and hf.get("sliding_window") is not None and i >= hf.get("max_window_layers", 28)
            else "full_attention"
            for i in range(n_layers)
        ]
        if any(t != "full_attention" for t in layer_types):
            raise UnsupportedModelError(
                f"{where}: sliding-window attention (use_sliding_window / layer_types) is "
                "not supported; genloop attends over the full context"
            )
    else:
        if hf.get("sliding_window") is not None:
            raise UnsupportedModelError(
                f"{where}: sliding_window={hf['sliding_window']} is not supported; genloop "
                "attends over the full context"
            )
        if hf.get("attention_bias", False):
            raise UnsupportedModelError(f"{where}: attention_bias=true (a bias on q/k/v/o) is not supported for llama")
        if hf.get("layer_types") and any(t != "full_attention" for t in hf["layer_types"]):
            raise UnsupportedModelError(f"{where}: layer_types {sorted(set(hf['layer_types']))} are not supported")
    if hf.get("mlp_bias", False):
        raise UnsupportedModelError(f"{where}: mlp_bias=true is not supported")
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise UnsupportedModelError(f"{where}: hidden_act={act!r} is not supported (genloop's MLP is SwiGLU: silu)")
    try:
        dim, heads = hf["hidden_size"], hf["num_attention_heads"]
    except KeyError as e:
        raise CheckpointError(f"{where} lacks {e.args[0]}; it is corrupt or not a Llama/Qwen2 config") from None
    head_dim = hf.get("head_dim")
    if head_dim is not None and head_dim != dim // heads:
        raise UnsupportedModelError(
            f"{where}: head_dim={head_dim} differs from hidden_size / num_attention_heads = "
            f"{dim // heads}; not supported"
        )
    rope_from_hf(hf, where)
    return family


def hf_config(cfg: ModelConfig, tok: Tokenizer, dtype: str = "float32") -> dict:
    eos = list(dict.fromkeys([tok.eot_id, tok.im_end_id]))
    extra: dict = {}
    if cfg.rope_scaling:
        extra["rope_parameters"] = {"rope_type": "llama3", "rope_theta": cfg.rope_theta, **cfg.rope_scaling}
    if cfg.family == "qwen2":
        extra.update(use_sliding_window=False, sliding_window=None)
    return {
        "architectures": [CAUSAL_LM[cfg.family]],
        "model_type": cfg.family,
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
        "attention_bias": cfg.family != "llama",
        "mlp_bias": False,
        "initializer_range": cfg.init_std,
        "bos_token_id": tok.bos_id,
        "eos_token_id": eos,
        "pad_token_id": tok.pad_id,
        "torch_dtype": dtype,
        "use_cache": True,
        **extra,
    }


def model_config_from_hf(hf: dict, where: str = "config.json") -> ModelConfig:
    """genloop's ``ModelConfig`` of a supported Hugging Face config (``check_supported`` first)."""
    family = check_supported(hf, where)
    theta, scaling = rope_from_hf(hf, where)
    return ModelConfig(
        dim=hf["hidden_size"],
        n_layers=hf["num_hidden_layers"],
        n_heads=hf["num_attention_heads"],
        n_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        ffn_hidden=hf["intermediate_size"],
        vocab_size=hf["vocab_size"],
        max_seq_len=hf.get("max_position_embeddings", 32768 if family == "qwen2" else 2048),
        rope_theta=theta,
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        init_std=float(hf.get("initializer_range", 0.02)),
        qkv_bias=family == "qwen2",
        rope_scaling=scaling,
        family=family,
    )


class HFStateDictAdapter:
    """genloop state dict <-> the one a Hugging Face folder holds (torchtitan's ``StateDictAdapter`` shape).

    genloop's modules carry Hugging Face's parameter names, and its RoPE is the rotate-half layout HF Llama/Qwen2
    checkpoints are stored in, so names map to themselves and Q/K need no permutation (torchtune's ``_permute`` is
    only for Meta's interleaved layout; GGUF's llama.cpp permutation is undone by transformers' GGUF loader before
    genloop sees the weights). What differs: a tied ``lm_head.weight`` is absent on disk, and older checkpoints carry
    ``rotary_emb.inv_freq`` buffers genloop recomputes."""

    def __init__(self, cfg: ModelConfig) -> None:
        self.cfg = cfg

    def from_hf(self, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {k: v for k, v in sd.items() if not k.endswith("rotary_emb.inv_freq")}
        if self.cfg.tie_embeddings:
            out.pop("lm_head.weight", None)
        return out

    def to_hf(self, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = dict(sd)
        if self.cfg.tie_embeddings:
            out.pop("lm_head.weight", None)
        return out


def save_tokenizer_files(tok: Tokenizer, out: Path, max_len: int) -> None:
    """tiktoken files for genloop plus the Hugging Face tokenizer files with the chat template; a model's own Hugging
    Face tokenizer (``HFTokenizer``) writes its original files, unchanged."""
    tok.save(out)
    if getattr(tok, "kind", "tiktoken") == "hf":
        return
    (out / "tokenizer.json").write_text(to_hf_tokenizer_json(tok))
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
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
            },
            indent=2,
        )
        + "\n"
    )


def save_checkpoint(
    model: Transformer, tok: Tokenizer, out: str | Path, state_dict: dict | None = None, generation: dict | None = None
) -> Path:
    """Write a Hugging Face–format folder. ``state_dict`` overrides the module's (e.g. gathered from FSDP)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = model.cfg
    if tok.n_vocab > cfg.vocab_size:
        raise CheckpointError(f"tokenizer {tok.name} has {tok.n_vocab} tokens but the model only {cfg.vocab_size}")
    sd = state_dict if state_dict is not None else model.state_dict()
    sd = HFStateDictAdapter(cfg).to_hf({k: v.detach().to("cpu").contiguous() for k, v in sd.items()})
    dtype = str(next(iter(sd.values())).dtype).removeprefix("torch.")
    save_file(sd, str(out / WEIGHTS), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(hf_config(cfg, tok, dtype), indent=2) + "\n")
    gen = {
        "bos_token_id": tok.bos_id,
        "eos_token_id": list(dict.fromkeys([tok.eot_id, tok.im_end_id])),
        "pad_token_id": tok.pad_id,
        "do_sample": True,
        "temperature": 0.8,
        "top_k": 50,
        **(generation or {}),
    }
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
    raise CheckpointError(
        f"{path}: no checkpoint there (expected config.json in it or in model/); "
        "pass a model folder a genloop training stage wrote"
    )


def read_hf_config(path: str | Path) -> dict:
    """``<path>/config.json`` as a dict; CheckpointError when missing or not JSON."""
    cfg_path = Path(path) / "config.json"
    if not cfg_path.exists():
        raise CheckpointError(
            f"{path} is not a checkpoint: no config.json (point at a folder a genloop stage wrote "
            "or a Hugging Face model folder)"
        )
    try:
        hf = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_path} is corrupt ({e!r}); re-export the checkpoint") from None
    if not isinstance(hf, dict):
        raise CheckpointError(f"{cfg_path} is not a model config (a JSON object); re-export the checkpoint")
    return hf


def load_config(path: str | Path) -> ModelConfig:
    """The ``ModelConfig`` of a checkpoint folder; an unsupported model is refused here, before any weight is read."""
    cfg_path = Path(path) / "config.json"
    hf = read_hf_config(path)
    try:
        return model_config_from_hf(hf, str(cfg_path))
    except (KeyError, TypeError) as e:
        raise CheckpointError(
            f"{cfg_path} is corrupt or not a Llama config ({e!r}); re-export the checkpoint"
        ) from None


def load_tokenizer(path: str | Path) -> Tokenizer:
    """The checkpoint's tokenizer: genloop's tiktoken one (``tokenizer_spec.json``) when the folder has it, else the
    model's own Hugging Face tokenizer (``tokenizer.json``) as an ``HFTokenizer``."""
    try:
        return Tokenizer.load(path)
    except TokenizerError as e:
        raise CheckpointError(f"checkpoint {path}: {e}") from None


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of ``path/model.safetensors``, or of the shards ``model.safetensors.index.json`` lists."""
    index = path / WEIGHTS_INDEX
    files = [path / WEIGHTS]
    if not files[0].exists() and index.exists():
        try:
            files = [path / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
        except (json.JSONDecodeError, KeyError, AttributeError) as e:
            raise CheckpointError(f"{index} is corrupt ({e!r}); re-export the model") from None
    if not files[0].exists() and not index.exists():
        others = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.gguf"))
        hint = (
            f" (it holds {', '.join(others[:3])}: convert with `genloop import-model {path} --out DIR`)"
            if others
            else "; re-export the model, or import it with `genloop import-model`"
        )
        raise CheckpointError(f"{path}: no weights ({WEIGHTS} or {WEIGHTS_INDEX}){hint}")
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            sd.update(load_file(str(f)))
        except (SafetensorError, FileNotFoundError, OSError) as e:
            raise CheckpointError(f"{f} is missing or corrupt ({e}); re-export the model") from None
    return sd


def load_weights(
    path: Path,
    model_cls: type[nn.Module],
    cfg: ModelConfig,
    device: str | torch.device = "cpu",
    skip: set[str] | frozenset[str] = frozenset(),
) -> nn.Module:
    """``model_cls(cfg)`` built on ``device`` without initialising it, filled from ``path/model.safetensors``; names in
    ``skip`` (a tied lm_head) are neither loaded nor required. A missing or corrupt file, or names that do not match
    the config, are CheckpointErrors."""
    sd = HFStateDictAdapter(cfg).from_hf(read_weights(path))
    for k in skip:
        sd.pop(k, None)
    with torch.device("meta"):
        model = model_cls(cfg)
    model = model.to_empty(device=device)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if k not in skip]
    if missing or unexpected:
        raise CheckpointError(
            f"{path / WEIGHTS} does not match config.json: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    return model


def load_checkpoint(
    path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> tuple[Transformer, Tokenizer]:
    """(model, tokenizer) from a folder written by ``save_checkpoint``, or any Hugging Face folder of a supported
    architecture (with its own tokenizer)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist; pass the folder a training stage wrote")
    cfg = load_config(path)
    tok = load_tokenizer(path)
    if tok.n_vocab > cfg.vocab_size:
        raise CheckpointError(
            f"{path}: tokenizer has {tok.n_vocab} tokens but config.json says vocab_size={cfg.vocab_size}; "
            "the tokenizer files do not belong to these weights (put the model's own tokenizer files next to them)"
        )
    tied = {"lm_head.weight"} if cfg.tie_embeddings else set()
    model = load_weights(path, Transformer, cfg, device, skip=tied)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    if dtype is not None:
        model = model.to(dtype)
    return model, tok

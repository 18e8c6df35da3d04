"""LoRA: low-rank adapters on chosen ``nn.Linear`` layers, merge back into the base weights, PEFT-format export.

``y = x W^T + (alpha / r) * (x A^T) B^T`` with ``A`` (r, in) random, ``B`` (out, r) zero, so a freshly wrapped model
computes exactly what the base model does. Only ``A`` and ``B`` train; every base parameter is frozen.

Export: ``merged_state_dict`` gives base names with ``W + (alpha/r) B A`` folded in (a plain Hugging Face checkpoint);
``save_peft_adapter`` writes ``adapter_config.json`` + ``adapter_model.safetensors`` with PEFT's key names
(``base_model.model.<module>.lora_A.weight``), which ``peft.PeftModel.from_pretrained`` and vLLM's LoRA loader read.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import save_file

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


@dataclass
class LoraConfig:
    """``rank: 0`` turns LoRA off (full fine-tuning). ``target_modules`` match the last part of a module's name."""

    rank: int = 0
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


class LoraLinear(nn.Module):
    """A frozen ``nn.Linear`` plus a trainable low-rank update. ``base`` keeps the original module (and its name)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        if rank <= 0:
            raise ValueError(f"LoRA rank must be positive, got {rank}")
        self.base = base
        self.rank, self.scaling = rank, alpha / rank
        dev, dtype = base.weight.device, base.weight.dtype
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=dev, dtype=dtype))  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=dev, dtype=dtype))  # (out, r)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # PEFT's default init for A
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        for p in self.base.parameters():
            p.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (self.dropout(x) @ self.lora_A.t() @ self.lora_B.t()) * self.scaling

    def delta(self) -> torch.Tensor:
        """(out, in): what merging adds to the base weight, ``scaling * B @ A``."""
        return (self.lora_B @ self.lora_A) * self.scaling


def _matches(name: str, targets: list[str]) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


def apply_lora(model: nn.Module, cfg: LoraConfig) -> list[str]:
    """Freeze ``model`` and wrap every ``nn.Linear`` whose name matches ``cfg.target_modules``; the wrapped names."""
    for p in model.parameters():
        p.requires_grad_(False)
    targets = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and _matches(n, cfg.target_modules)]
    if not targets:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ValueError(f"lora.target_modules={cfg.target_modules} match no Linear layer; choose from {linear}")
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoraLinear(module, cfg.rank, cfg.alpha, cfg.dropout))
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())
    log.info(
        "LoRA r=%d alpha=%g on %d layers: %d trainable of %d params (%.2f%%)",
        cfg.rank,
        cfg.alpha,
        len(targets),
        n_train,
        n_all,
        100 * n_train / max(n_all, 1),
    )
    return [n for n, _ in targets]


def lora_layers(model: nn.Module) -> dict[str, LoraLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLinear)}


def merge_state_dict(sd: dict[str, torch.Tensor], scaling: float) -> dict[str, torch.Tensor]:
    """A state dict of a LoRA-wrapped model -> the base model's names with ``W + scaling * B A`` folded in.

    Works on any full state dict of the wrapped model (e.g. the one the training loop gathers from DDP/FSDP).
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if key.endswith((".lora_A", ".lora_B")):
            continue
        if key.endswith(".base.weight") and key[: -len(".base.weight")] + ".lora_A" in sd:
            name = key[: -len(".base.weight")]
            a, b = sd[name + ".lora_A"], sd[name + ".lora_B"]  # (r, in), (out, r)
            out[name + ".weight"] = (value + (scaling * (b.float() @ a.float())).to(value.dtype)).detach()
        elif key.endswith(".base.weight") or key.endswith(".base.bias"):
            out[key.replace(".base.", ".")] = value.detach()
        else:
            out[key] = value.detach()
    return out


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base model's state dict (original names) with every adapter folded in: ``W + scaling * B A``."""
    layers = lora_layers(model)
    if not layers:
        return {k: v.detach() for k, v in model.state_dict().items()}
    scalings = {m.scaling for m in layers.values()}
    if len(scalings) != 1:
        raise ValueError("LoRA layers with different alpha/rank cannot be merged from one scaling")
    return merge_state_dict(model.state_dict(), scalings.pop())


def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every ``LoraLinear`` in place by its base ``nn.Linear`` with the adapter folded in."""
    for name, layer in lora_layers(model).items():
        with torch.no_grad():
            layer.base.weight += layer.delta().to(layer.base.weight.dtype)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer.base)
    return model


def peft_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Adapter weights of a wrapped model's state dict under PEFT's names:
    ``base_model.model.<module>.lora_A.weight`` (r, in) and ``.lora_B.weight`` (out, r)."""
    out = {}
    for key, value in sd.items():
        for part in ("lora_A", "lora_B"):
            if key.endswith("." + part):
                out[f"base_model.model.{key[: -len(part) - 1]}.{part}.weight"] = value.detach().cpu().contiguous()
    return out


def load_peft_adapter(model: nn.Module, path: str | Path) -> nn.Module:
    """Wrap ``model`` as ``adapter_config.json`` says and load ``adapter_model.safetensors`` into the adapters."""
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / ADAPTER_CONFIG).exists():
        raise FileNotFoundError(f"{path / ADAPTER_CONFIG} not found; point at a folder `genloop sft export=peft` wrote")
    conf = json.loads((path / ADAPTER_CONFIG).read_text())
    cfg = LoraConfig(rank=int(conf["r"]), alpha=float(conf["lora_alpha"]), target_modules=list(conf["target_modules"]))
    apply_lora(model, cfg)
    sd = load_file(str(path / ADAPTER_WEIGHTS))
    layers = lora_layers(model)
    for name, layer in layers.items():
        with torch.no_grad():
            layer.lora_A.copy_(sd[f"base_model.model.{name}.lora_A.weight"])
            layer.lora_B.copy_(sd[f"base_model.model.{name}.lora_B.weight"])
    if len(sd) != 2 * len(layers):
        raise ValueError(f"{path / ADAPTER_WEIGHTS} holds {len(sd)} tensors, expected {2 * len(layers)}")
    return model


def save_peft_adapter(
    model: nn.Module,
    cfg: LoraConfig,
    out: str | Path,
    base_model: str = "",
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write a PEFT adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``).
    ``state_dict`` overrides the module's (e.g. the full one gathered from FSDP)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    layers = lora_layers(model)
    if not layers:
        raise ValueError("model has no LoRA layers to export; train with lora.rank > 0 or export a merged checkpoint")
    save_file(
        peft_state_dict(state_dict if state_dict is not None else model.state_dict()),
        str(out / ADAPTER_WEIGHTS),
        metadata={"format": "pt"},
    )
    (out / ADAPTER_CONFIG).write_text(
        json.dumps(
            {
                "peft_type": "LORA",
                "task_type": "CAUSAL_LM",
                "base_model_name_or_path": str(base_model),
                "r": cfg.rank,
                "lora_alpha": cfg.alpha,
                "lora_dropout": cfg.dropout,
                "target_modules": sorted({n.rsplit(".", 1)[-1] for n in layers}),
                "bias": "none",
                "fan_in_fan_out": False,
                "inference_mode": True,
                "init_lora_weights": True,
                "modules_to_save": None,
                "use_rslora": False,
                "use_dora": False,
            },
            indent=2,
        )
        + "\n"
    )
    return out

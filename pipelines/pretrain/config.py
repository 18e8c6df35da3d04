"""The pretrain stage's typed config (``pretrain:`` section): a fresh model's architecture or a checkpoint to continue
from, the data, and the shared training loop's settings. ``genloop plan`` reads the same section."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

from models.transformer import MODEL_PRESETS, ModelConfig, model_preset
from pipelines.config import ConfigError
from pipelines.train.config import TrainLoopConfig


@dataclass
class ModelSection:
    """A fresh model's architecture: a preset (``models/transformer.py`` MODEL_PRESETS) and per-field overrides
    (None = the preset's value). ``model: demo`` is short for ``model: {preset: demo}``; ``model.dim=128`` overrides
    one field. Ignored with ``init_from`` (the checkpoint's architecture is used)."""

    SHORTHAND: ClassVar[str] = "preset"

    preset: str = "tiny"
    dim: int | None = None
    n_layers: int | None = None
    n_heads: int | None = None
    n_kv_heads: int | None = None
    ffn_hidden: int | None = None
    vocab_size: int | None = None  # None / 0: the tokenizer's, rounded up to a multiple of 64
    max_seq_len: int | None = None
    rope_theta: float | None = None
    norm_eps: float | None = None
    tie_embeddings: bool | None = None
    init_std: float | None = None

    def __post_init__(self) -> None:
        if self.preset not in MODEL_PRESETS:
            raise ConfigError(f"unknown model preset model.preset={self.preset!r}; known: {', '.join(MODEL_PRESETS)}")
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name != "preset" and isinstance(v, (int, float)) and not isinstance(v, bool) and v < 0:
                raise ConfigError(f"model.{f.name}={v} must not be negative")
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "ffn_hidden", "max_seq_len"):
            if getattr(self, name) == 0:
                raise ConfigError(f"model.{name}=0: give a positive size (or leave it unset for the preset's)")

    def overrides(self) -> dict[str, Any]:
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name != "preset" and getattr(self, f.name) is not None
        }


@dataclass
class PretrainConfig:
    data: str = ""  # a tokenized dataset folder from `genloop data`
    out: str = ""
    model: ModelSection = field(default_factory=ModelSection)  # a fresh model: model.preset, model.dim, ...
    init_from: str = ""  # a checkpoint folder (or a pretrain artifact holding model/): domain fine-tuning
    seq_len: int = 0  # 0 = the dataset's block length; shorter crops the blocks
    overwrite: bool = False
    train: TrainLoopConfig = field(default_factory=lambda: TrainLoopConfig(name="pretrain"))


def model_config(config: PretrainConfig, n_vocab: int, seq_len: int) -> ModelConfig:
    """A fresh model's architecture: the preset, the overrides, the tokenizer's vocab, room for seq_len."""
    base = model_preset(config.model.preset)
    cfg = dataclasses.replace(base, **config.model.overrides()).for_tokenizer(n_vocab)
    if cfg.max_seq_len < seq_len:
        cfg = dataclasses.replace(cfg, max_seq_len=seq_len)
    cfg.validate()
    return cfg

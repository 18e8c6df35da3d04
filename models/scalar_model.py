"""A scalar-head model: the transformer trunk + ``score = Linear(dim, 1, bias=False)``. The reward model, and PPO's
value model.

``forward`` gives one score per position, (B, T); a sequence's score is the one at its last non-pad token
(``sequence_scores``), the rule ``transformers``' ``LlamaForSequenceClassification`` uses (rightmost token that is
not ``pad_token_id``, so left and right padding both work).

On disk it is a Hugging Face ``LlamaForSequenceClassification`` folder: ``config.json`` (``architectures``,
``num_labels: 1``, ``pad_token_id``), ``model.safetensors`` with ``model.*`` + ``score.weight`` (no ``lm_head``), and
the checkpoint's tokenizer files, so ``AutoModelForSequenceClassification.from_pretrained(DIR)`` loads it and gives the
same scores. ``from_causal_lm`` builds one from a causal-LM checkpoint (trunk copied, head initialised small).

Names for other stages: ``ScalarModel``, ``sequence_scores``, ``last_token_index``, ``from_causal_lm``,
``save_scalar_model``, ``load_scalar_model``. It subclasses ``Transformer`` (without ``lm_head``), so
``models.parallel.wrap_model`` (DDP | FSDP2), activation checkpointing and ``flops_per_token`` apply unchanged (MFU counts
the 1-wide score head as the output projection: ``head_out=1``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import save_file

from models.checkpoint import (
    WEIGHTS,
    CheckpointError,
    hf_config,
    load_checkpoint,
    load_config,
    load_tokenizer,
    load_weights,
    save_tokenizer_files,
)
from models.tokenizer import Tokenizer
from models.transformer import ModelConfig, Transformer

log = logging.getLogger(__name__)

ARCHITECTURE = "LlamaForSequenceClassification"
ARCHITECTURES = {"llama": ARCHITECTURE, "qwen2": "Qwen2ForSequenceClassification"}  # by ModelConfig.family


class ScalarModel(Transformer):
    """Trunk (``model.*``) + ``score`` head; no ``lm_head``."""

    def __init__(self, cfg: ModelConfig, head_std: float | None = None) -> None:
        super().__init__(cfg)
        del self.lm_head  # tied to the embeddings (or a separate matrix): a scalar model has no LM head
        self.score = nn.Linear(cfg.dim, 1, bias=False)
        nn.init.normal_(self.score.weight, std=cfg.init_std if head_std is None else head_std)

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if hasattr(self, "score"):
            nn.init.normal_(self.score.weight, std=self.cfg.init_std)

    def forward(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None, doc_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Per-position scores (B, T) in float32."""
        return self.score(self.hidden_states(input_ids, position_ids, doc_ids)).squeeze(-1).float()


def last_token_index(input_ids: torch.Tensor, pad_id: int) -> torch.Tensor:
    """(B,) index of each row's rightmost token that is not ``pad_id`` (0 for an all-pad row), as transformers."""
    T = input_ids.shape[-1]
    positions = torch.arange(T, device=input_ids.device)
    return (positions * (input_ids != pad_id)).argmax(-1)


def sequence_scores(scores: torch.Tensor, input_ids: torch.Tensor, pad_id: int) -> torch.Tensor:
    """(B,) the score at each row's last non-pad token; ``scores`` (B, T) from ``ScalarModel.forward``."""
    idx = last_token_index(input_ids, pad_id)
    return scores.gather(1, idx[:, None]).squeeze(1)


def from_causal_lm(path: str | Path, head_std: float | None = None) -> tuple[ScalarModel, Tokenizer]:
    """A scalar model whose trunk is the causal-LM checkpoint's at ``path`` (a folder ``save_checkpoint`` wrote);
    the head is drawn from N(0, head_std) (default the model's ``init_std``), so first scores are small."""
    lm, tok = load_checkpoint(path)
    model = ScalarModel(lm.cfg, head_std=head_std)
    trunk = {k: v for k, v in lm.state_dict().items() if not k.startswith("lm_head.")}
    missing, unexpected = model.load_state_dict(trunk, strict=False)
    if unexpected or [k for k in missing if k != "score.weight"]:
        raise CheckpointError(
            f"{path}: trunk does not fit a scalar model (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    return model, tok


def scalar_config(cfg: ModelConfig, tok: Tokenizer, dtype: str = "float32") -> dict:
    """``config.json`` of a ``LlamaForSequenceClassification`` (``Qwen2ForSequenceClassification`` for a Qwen2
    trunk) with one label (the score)."""
    hf = hf_config(cfg, tok, dtype)
    hf.update(
        architectures=[ARCHITECTURES[cfg.family]],
        num_labels=1,
        id2label={"0": "LABEL_0"},
        label2id={"LABEL_0": 0},
        pad_token_id=tok.pad_id,
        tie_word_embeddings=False,
        use_cache=False,
    )
    return hf


def save_scalar_model(model: ScalarModel, tok: Tokenizer, out: str | Path, state_dict: dict | None = None) -> Path:
    """Write the HF ``...ForSequenceClassification`` folder. ``state_dict`` overrides the module's (FSDP gather)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sd = state_dict if state_dict is not None else model.state_dict()
    sd = {k: v.detach().to("cpu").contiguous() for k, v in sd.items() if not k.startswith("lm_head.")}
    if "score.weight" not in sd:
        raise CheckpointError("save_scalar_model: the state dict has no score.weight; pass a ScalarModel's")
    dtype = str(sd["score.weight"].dtype).removeprefix("torch.")
    save_file(sd, str(out / WEIGHTS), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(scalar_config(model.cfg, tok, dtype), indent=2) + "\n")
    save_tokenizer_files(tok, out, model.cfg.max_seq_len)
    log.info("saved scalar model %s (%.2fM params)", out, model.cfg.num_params(embeddings=True) / 1e6)
    return out


def load_scalar_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[ScalarModel, Tokenizer]:
    """(model, tokenizer) from a folder ``save_scalar_model`` wrote (a reward or value model)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"scalar model {path} does not exist; pass the model folder `genloop reward` wrote")
    arch = (
        json.loads((path / "config.json").read_text()).get("architectures", [])
        if (path / "config.json").exists()
        else []
    )
    if not set(arch) & set(ARCHITECTURES.values()):
        raise CheckpointError(
            f"{path} is not a reward/value model (config.json architectures={arch}, expected "
            f"{' or '.join(ARCHITECTURES.values())}); pass the model folder `genloop reward` wrote"
        )
    cfg = load_config(path)
    tok = load_tokenizer(path)
    model = load_weights(path, ScalarModel, cfg, device)
    return model, tok

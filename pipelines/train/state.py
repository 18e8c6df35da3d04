"""Training state I/O: the optimizer, torch distributed checkpoints of model + optimizer + loop state, and the final
export. Public for every learner built on Ray Train (the shared loop, RLHF's learner):

* ``build_optimizer(model, cfg)``: AdamW over ``requires_grad`` parameters (weight decay on matrices only; fused on
  CUDA).
* ``save_train_state(ckpt_dir, model, opt, state, rank)``: every rank writes its shards (``dcp``; sharded under
  FSDP2), rank 0 writes ``loop_state.json`` = ``state`` (step, history, anything JSON).
  ``load_train_state(ckpt_dir, model, opt) -> state`` restores both in place (at any world size).
* ``full_state_dict(model)``: the gathered, CPU, unwrapped-name state dict (every rank must call it under FSDP).
* ``hf_export(tokenizer)``: the default export, a Hugging Face causal-LM folder ``<out>/model``;
  ``local_dir(uri)``: a local folder for an ``s3://`` target, uploaded on exit.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from pipelines.artifacts import filesystem, join, local_copy
from pipelines.train.config import LOOP_STATE, MODEL_DIR, TrainLoopConfig


def build_optimizer(model: nn.Module, cfg: TrainLoopConfig) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; weight decay on matrices (dim >= 2) only. lr is set per step."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters (every requires_grad is False)")
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    device_type = params[0].device.type
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=tuple(cfg.betas),
        fused=device_type == "cuda",
    )


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def save_train_state(
    ckpt_dir: str, model: nn.Module, opt: torch.optim.Optimizer | None, state: dict[str, Any], rank: int
) -> None:
    """Model (+ optimizer) as a torch distributed checkpoint in ``ckpt_dir`` (each rank its shards) and ``state``
    as ``loop_state.json`` (rank 0). Collective: every rank calls it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    sd: dict[str, Any] = {"model": get_model_state_dict(model)}
    if opt is not None:
        sd["optim"] = get_optimizer_state_dict(model, opt)
    dcp.save(sd, checkpoint_id=ckpt_dir)
    if rank == 0:
        Path(ckpt_dir, LOOP_STATE).write_text(json.dumps(state))


def load_train_state(ckpt_dir: str, model: nn.Module, opt: torch.optim.Optimizer | None) -> dict[str, Any]:
    """Restore what ``save_train_state`` wrote into ``model`` (+ ``opt``) in place; returns the saved state."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    sd: dict[str, Any] = {"model": get_model_state_dict(model)}
    if opt is not None:
        sd["optim"] = get_optimizer_state_dict(model, opt)
    dcp.load(sd, checkpoint_id=ckpt_dir)
    set_model_state_dict(model, sd["model"])
    if opt is not None:
        set_optimizer_state_dict(model, opt, sd["optim"])
    return json.loads(Path(ckpt_dir, LOOP_STATE).read_text())


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The full (gathered under FSDP2), CPU state dict with the bare model's names. Every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


class local_dir:
    """A local folder for ``uri``: the path itself when local, else a temp dir uploaded on exit."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.tmp = tempfile.mkdtemp() if "://" in uri else None

    def __enter__(self) -> str:
        return self.tmp or self.uri

    def __exit__(self, *exc) -> None:
        if self.tmp:
            import pyarrow.fs as pafs

            if exc[0] is None:
                fs, path = filesystem(self.uri)
                pafs.copy_files(self.tmp, path, destination_filesystem=fs)
            shutil.rmtree(self.tmp, ignore_errors=True)


def hf_export(tokenizer: str) -> Callable[[nn.Module, dict, str], str]:
    """The default export: a Hugging Face folder ``<out>/model`` (``save_checkpoint``) with the given tokenizer."""

    def export(model: nn.Module, state_dict: dict, out: str) -> str:
        from models.checkpoint import save_checkpoint
        from models.tokenizer import Tokenizer

        tok = Tokenizer.load(local_copy(tokenizer))  # a URI (s3:// dataset) is downloaded once per node
        target = join(out, MODEL_DIR)
        with local_dir(target) as local:
            save_checkpoint(model, tok, local, state_dict=state_dict)
        return target

    return export

"""Parallelism wrappers for ``Transformer`` (kept out of the model file): DDP, FSDP2, activation checkpointing,
``torch.compile``.

All wrappers keep Hugging Face parameter names intact (activation checkpointing and compile act on each block's
``forward`` in place, FSDP2's ``fully_shard`` swaps the module class in place), so ``get_model_state_dict`` gives
``model.layers.N...`` keys whatever the strategy.

Gradient semantics: DDP and FSDP2 both *average* gradients over ranks, so a caller that wants a global-batch
token-mean loss divides its local loss sum by the global token count and multiplies by the world size.
"""

from __future__ import annotations

import functools
import logging
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from models.transformer import Transformer

log = logging.getLogger(__name__)

Strategy = Literal["ddp", "fsdp", "none"]


def enable_activation_checkpointing(model: Transformer) -> None:
    """Recompute each block's activations in backward (memory for compute); names unchanged."""
    for block in model.model.layers:
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)


def compile_blocks(model: Transformer) -> None:
    """``torch.compile`` each block in place (per-block graphs compile fast and compose with FSDP2)."""
    for block in model.model.layers:
        block.compile()


def wrap_model(
    model: Transformer,
    strategy: Strategy,
    device: torch.device,
    activation_checkpointing: bool = False,
    compile: bool = False,
    mixed_precision: bool | None = None,
    reshard_after_forward: Literal["default", "always", "never"] = "default",
) -> nn.Module:
    """The module to train: ``model`` moved to ``device`` and wrapped for ``strategy``.

    ``fsdp``: ``fully_shard`` each transformer block, then the root (embeddings, final norm, tied head);
    ``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)`` when ``mixed_precision`` (default: on CUDA).
    ``reshard_after_forward`` (torchtitan's policy): ``default`` frees every block's gathered parameters after its
    forward except the last one's (needed at once by backward); ``never`` keeps them until backward (one all-gather
    per block per step instead of two, at the memory of the full model: ZeRO-2); ``always`` frees all.
    Each block prefetches its neighbour's parameters (``prefetch_neighbours``).
    ``ddp``: ``DistributedDataParallel`` (device_ids on CUDA), or the bare model on a one-rank group. ``none``: the bare
    model.
    """
    if strategy != "none" and not (dist.is_available() and dist.is_initialized()):
        raise ValueError(f"strategy {strategy!r} needs torch.distributed initialised (run under Ray Train)")
    if activation_checkpointing:
        enable_activation_checkpointing(model)
    if compile:
        compile_blocks(model)
    if mixed_precision is None:
        mixed_precision = device.type == "cuda"
    if strategy == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        kwargs = {}
        if mixed_precision:
            kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        model.to(device)
        layers = list(model.model.layers)
        for i, block in enumerate(layers):
            # the last block's parameters are needed again as soon as backward starts: keep them gathered
            # (torchtitan's default policy), saving one all-gather per step
            keep = reshard_after_forward == "never" or (reshard_after_forward == "default" and i == len(layers) - 1)
            fully_shard(block, reshard_after_forward=not keep, **kwargs)
        fully_shard(model, reshard_after_forward=reshard_after_forward != "never", **kwargs)
        prefetch_neighbours(model, layers, device)
        return model
    model.to(device)
    if strategy == "ddp" and dist.get_world_size() == 1:
        return model  # one rank: nothing to all-reduce (DDP would still copy every gradient into its buckets)
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return model


def prefetch_neighbours(model: nn.Module, layers: list[nn.Module], device: torch.device) -> None:
    """FSDP2 explicit prefetching: block i's forward starts block i+1's all-gather (the root's starts block 0's), block
    i's backward starts block i-1's. On CPU (gloo) the all-gathers are also issued asynchronously: CPU has no
    streams to overlap them on, so without this every all-gather blocks compute and absorbs the ranks' skew."""
    model.set_modules_to_forward_prefetch(layers[:1])
    for i, block in enumerate(layers):
        if i + 1 < len(layers):
            block.set_modules_to_forward_prefetch([layers[i + 1]])
        if i > 0:
            block.set_modules_to_backward_prefetch([layers[i - 1]])
    if device.type == "cpu":
        model._set_unshard_async_op(True)  # torch 2.13: private, but the documented companion of explicit prefetch


def unwrap(module: nn.Module) -> Transformer:
    """The ``Transformer`` inside a DDP wrapper (FSDP2 and ``none`` return the module itself)."""
    return module.module if hasattr(module, "module") and isinstance(module.module, Transformer) else module


def set_gradient_sync(module: nn.Module, strategy: Strategy, enabled: bool):
    """Context manager / call that turns gradient all-reduce off for accumulation micro-batches but the last."""
    import contextlib

    if strategy == "ddp" and not enabled and hasattr(module, "no_sync"):  # a lone rank's model is not wrapped
        return module.no_sync()
    if strategy == "fsdp":
        module.set_requires_gradient_sync(enabled)
    return contextlib.nullcontext()


def native_bf16(device: torch.device) -> bool:
    """Does ``device`` compute bf16 matmuls natively? GPUs yes; a CPU only with AVX512-BF16 or AMX (oneDNN's check)."""
    if device.type != "cpu":
        return True
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


_warned_emulated: list[bool] = []


def autocast(mode: str, device: torch.device):
    """The forward's compute context: ``"none"`` (the parameters' dtype, fp32) or ``"bf16"`` (bfloat16 autocast:
    matmuls in bf16, reductions and losses in fp32; weights, gradients and the optimizer stay fp32). On CPUs with
    AVX512-BF16 / AMX bf16 roughly doubles training tokens/s (SmolLM2-135M on 2 cores: ~145 -> ~270). On a CPU
    without them bf16 is emulated: measured on an AVX2-only EPYC, SmolLM2-135M 16x64 tokens per step, fp32 120
    tokens/s, bf16 autocast 2 tokens/s; there ``"bf16"`` runs fp32 and says so once."""
    import contextlib

    if mode == "none":
        return contextlib.nullcontext()
    if mode != "bf16":
        raise ValueError(f"autocast={mode!r}: use none or bf16")
    if not native_bf16(device):
        if not _warned_emulated:
            _warned_emulated.append(True)
            log.warning(
                "autocast=bf16 ignored: this CPU (%s) has no AVX512-BF16/AMX, so bf16 would be emulated "
                "(~50x slower than fp32); computing in fp32",
                torch.backends.cpu.get_cpu_capability(),
            )
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)

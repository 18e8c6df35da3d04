"""``genloop plan``: what a pretraining run costs before it starts — parameters, FLOPs, memory per GPU, GPUs, days, $.

Pure functions over ``ModelConfig`` (no Ray, no GPU needed). The run's shape (model, seq_len, micro-batch,
strategy, activation checkpointing) comes from a preset's ``pretrain:`` section, so the plan describes the run
``genloop pretrain --config PRESET`` would start.

FLOPs: ``ModelConfig.flops_per_token``: 6N for the N weights that multiply activations (every block's projections
and the output projection, counted even when tied to the embedding table; not the input embedding lookup or the
norms) plus the attention-score term 12·L·d·T (PaLM appendix B; torchtitan's ``get_num_flop_per_token`` counts the
same); the same count the training loop divides by for MFU (``pipelines.train.metrics.model_flops_per_token``), and
the same GPU table (``pipelines.train.metrics.GPUS``), so a plan's tokens/s at an MFU and a run's measured tokens/s
and MFU are directly comparable.

Memory per GPU follows what genloop's wrappers (``models/parallel.py``) and loop (``pipelines/train/loop.py``) do:

- model states, 16 bytes per parameter either way (ZeRO paper, Rajbhandari et al. 2020, Table 1):
  DDP keeps fp32 weights (4), fp32 gradients (4), AdamW exp_avg + exp_avg_sq (8) on every rank, plus the DDP
  reducer's gradient buckets (4: ``gradient_as_bucket_view`` is off); FSDP2 shards the same 16 bytes over the
  ranks (fp32 sharded weights, fp32 reduce dtype) and holds a working set of gathered bf16 weights: the root
  (embeddings, lm_head, final norm: gathered through forward and backward) and three blocks (current, prefetched
  neighbour, the last block kept after forward), plus their unsharded gradients before the reduce-scatter;
- activations saved for backward, per token per layer (flash/fused SDPA keeps no T×T scores; GQA's k/v are
  repeated to every head before SDPA in ``models/transformer.py``):
  ``a·(10·d + 4·f) + 2·d·(4 - a) + 4·(2 + n_heads)`` bytes for activation width a (2: bf16 under FSDP2 on GPU,
  4: fp32 otherwise): each RMSNorm keeps its (fp32) input and normalised output, the q/k/v projections their
  shared input, SDPA q, k, v, its output (which o_proj reads as a view) and a fp32 log-sum-exp per head, the
  MLP its input and the SwiGLU gate, up and product (4·f); the loss keeps a fp32 log-softmax of (tokens × vocab)
  and, at its peak, the logits and their fp32 copy beside it;
  with activation checkpointing (per block) only each block's input (d per token) is kept, and one block's full
  set is rebuilt at a time in backward. ``tests/test_plan.py`` checks this against the bytes autograd really saves.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Literal, Mapping

from models.transformer import ModelConfig
from pipelines.train.metrics import GPUS, GpuSpec, gpu_key_for_device

GB = 1e9  # decimal gigabytes, as GPU data sheets and the ZeRO paper use them
CHINCHILLA_TOKENS_PER_PARAM = 20.0  # Hoffmann et al. 2022 (Chinchilla): 70B parameters on 1.4T tokens
ADAM_BYTES = 8  # exp_avg + exp_avg_sq, fp32
MASTER_BYTES = 4  # fp32 weights (DDP's only copy, FSDP2's sharded copy)
GRAD_BYTES = 4  # fp32 gradients (DDP) / fp32 reduce dtype (FSDP2's sharded grads)
DDP_BUCKET_BYTES = 4  # DDP reducer's flat gradient buckets (gradient_as_bucket_view=False, the default)

Strategy = Literal["ddp", "fsdp"]


# ---- hardware ------------------------------------------------------------------------------------------------------
# the GPU table lives with the training loop's MFU (pipelines/train/metrics.py), so a plan and a run divide by the
# same peak; re-exported here for ``genloop plan``'s callers
CPU = "cpu"  # no data sheet figure to trust: measured here (pipelines.train.metrics.cpu_peak_flops), host RAM as memory


def gpu_spec(name: str, cpu_threads: int | None = None) -> GpuSpec:
    """The table's row for ``name`` (case-insensitive), or this host measured for ``cpu``."""
    key = name.lower().strip()
    if key == CPU:
        from pipelines.train.metrics import cpu_peak_flops

        threads = cpu_threads or os.cpu_count() or 1
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return GpuSpec(
            f"this host's CPU ({threads} threads)",
            cpu_peak_flops(threads),
            float(ram),
            "measured fp32 matmul FLOP/s (pipelines.train.metrics), physical RAM",
        )
    if key not in GPUS:
        raise ValueError(
            f"unknown --gpu {name!r}; known: {', '.join(list(GPUS) + [CPU])} (add a row to "
            "pipelines/train/metrics.py GPUS for another)"
        )
    return GPUS[key]


# ---- parameters and FLOPs ------------------------------------------------------------------------------------------
def param_counts(cfg: ModelConfig) -> dict[str, int]:
    """total, non_embedding (the trunk's blocks and final norm), embedding (token table + untied lm_head),
    per_block, root (what FSDP2's root unit holds: everything outside the blocks), matmul (the N of 6ND: the blocks'
    projections and the output projection, tied or not)."""
    total = cfg.num_params()
    non_emb = cfg.num_params(embeddings=False)
    per_block = (non_emb - cfg.dim) // cfg.n_layers
    return {
        "total": total,
        "non_embedding": non_emb,
        "embedding": total - non_emb,
        "per_block": per_block,
        "root": total - cfg.n_layers * per_block,
        "matmul": cfg.matmul_params(),
    }


def training_flops(cfg: ModelConfig, seq_len: int, tokens: float) -> dict[str, float]:
    """6ND (N = the matmul parameters, output projection included), of it ``output_head`` (the output projection's
    6·d·V·D), the attention-score term 12·L·d·T·D, and their sum: ``ModelConfig.flops_per_token`` x D."""
    dense = 6.0 * cfg.matmul_params() * tokens
    total = cfg.flops_per_token(seq_len) * tokens
    return {
        "dense_6nd": dense,
        "output_head": 6.0 * cfg.dim * cfg.vocab_size * tokens,
        "attention": total - dense,
        "total": total,
    }


def compute_optimal_tokens(cfg: ModelConfig) -> float:
    """Chinchilla's rule of thumb: about 20 training tokens per parameter (all parameters)."""
    return CHINCHILLA_TOKENS_PER_PARAM * cfg.num_params()


# ---- memory --------------------------------------------------------------------------------------------------------
def model_state_bytes(n_params: float, strategy: Strategy, world: int) -> dict[str, float]:
    """Weights, gradients and AdamW states per rank: 16 bytes per parameter, sharded over ``world`` under FSDP2."""
    shard = world if strategy == "fsdp" else 1
    return {
        "params": MASTER_BYTES * n_params / shard,
        "grads": GRAD_BYTES * n_params / shard,
        "optimizer": ADAM_BYTES * n_params / shard,
    }


def layer_activation_bytes_per_token(cfg: ModelConfig, act_bytes: int) -> float:
    """Bytes one block saves for backward per token (see the module docstring for the terms)."""
    return act_bytes * (10 * cfg.dim + 4 * cfg.ffn_hidden) + 2 * cfg.dim * (4 - act_bytes) + 4 * (2 + cfg.n_heads)


def activation_bytes(
    cfg: ModelConfig, seq_len: int, micro_batch: int, act_bytes: int, checkpointing: bool
) -> dict[str, float]:
    """Activation memory of one micro-batch: ``blocks`` (all layers, or block inputs plus one rebuilt block with
    checkpointing), ``head_saved`` (final norm, lm_head input, fp32 log-softmax), ``head_transient`` (logits and
    their fp32 copy alive beside the log-softmax at the loss's peak)."""
    n = seq_len * micro_batch  # tokens per micro-batch
    layer = layer_activation_bytes_per_token(cfg, act_bytes) * n
    blocks = cfg.n_layers * cfg.dim * act_bytes * n + layer if checkpointing else cfg.n_layers * layer
    norm = 2 * cfg.dim * 4 if act_bytes == 4 else cfg.dim * (4 + act_bytes)  # RMSNorm's fp32 input + output
    # + RoPE cos/sin (2 x head_dim) and the int64 token ids and labels (16)
    head_saved = n * (norm + cfg.dim * act_bytes + 4 * cfg.vocab_size + 2 * cfg.head_dim * act_bytes + 16)
    # the logits (act_bytes) and, when they are not fp32 already, their fp32 copy
    head_transient = n * cfg.vocab_size * (act_bytes + (4 if act_bytes != 4 else 0))
    return {"blocks": float(blocks), "head_saved": float(head_saved), "head_transient": float(head_transient)}


def memory_per_gpu(
    cfg: ModelConfig,
    seq_len: int,
    micro_batch: int,
    world: int,
    strategy: Strategy,
    checkpointing: bool,
    mixed_precision: bool = True,
) -> dict[str, float]:
    """Bytes per GPU by part, and ``total``. ``mixed_precision``: FSDP2's bf16 compute (genloop's default on CUDA);
    DDP in genloop computes in fp32 (no autocast)."""
    if strategy not in ("ddp", "fsdp"):
        raise ValueError(f"strategy {strategy!r}: plan models ddp or fsdp")
    if world < 1:
        raise ValueError(f"world={world} must be >= 1")
    pc = param_counts(cfg)
    out = model_state_bytes(pc["total"], strategy, world)
    bf16 = strategy == "fsdp" and mixed_precision
    act_b = 2 if bf16 else 4
    if strategy == "ddp":
        out["comm_buffers"] = DDP_BUCKET_BYTES * pc["total"]
        out["gathered"] = 0.0
    else:
        out["comm_buffers"] = 0.0
        # gathered weights: root + 3 blocks; unsharded grads: the root's (reduced last) + 2 blocks in param dtype,
        # each block's also in the fp32 reduce dtype while it is reduce-scattered
        out["gathered"] = (
            act_b * (pc["root"] + 3 * pc["per_block"]) + act_b * pc["root"] + (act_b + 4) * 2 * pc["per_block"]
        )
    act = activation_bytes(cfg, seq_len, micro_batch, act_b, checkpointing)
    out["activations"] = act["blocks"]
    out["loss_head"] = act["head_saved"] + act["head_transient"]
    out["total"] = sum(out.values())
    return out


def fewest_gpus(
    cfg: ModelConfig,
    seq_len: int,
    micro_batch: int,
    strategy: Strategy,
    checkpointing: bool,
    capacity_bytes: float,
    mixed_precision: bool = True,
    max_world: int = 1 << 20,
) -> int | None:
    """The smallest world size whose per-GPU memory fits ``capacity_bytes``; None when none does (DDP: the model
    does not fit one GPU; FSDP2: the unsharded working set and activations alone exceed the GPU)."""

    def fits(w: int) -> bool:
        return (
            memory_per_gpu(cfg, seq_len, micro_batch, w, strategy, checkpointing, mixed_precision)["total"]
            <= capacity_bytes
        )

    if strategy == "ddp":
        return 1 if fits(1) else None
    if not fits(max_world):
        return None
    lo, hi = 1, max_world  # fits(hi); memory falls monotonically with w
    while lo < hi:
        mid = (lo + hi) // 2
        if fits(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo


# ---- the run's shape from a preset ---------------------------------------------------------------------------------
@dataclass
class RunShape:
    """What a plan needs of a pretrain run (``run_shape`` reads it from a preset, or build it directly)."""

    model: ModelConfig
    model_name: str = ""
    seq_len: int = 2048
    micro_batch_size: int = 1
    grad_accum: int = 1
    num_workers: int = 1
    cpus_per_worker: int = 1
    strategy: Strategy = "fsdp"
    activation_checkpointing: bool = False

    def global_batch_tokens(self, world: int) -> int:
        return self.micro_batch_size * self.grad_accum * world * self.seq_len


def _vocab_from_data(tokenizer: str, vocab_size: int) -> int:
    """The vocabulary a preset's data stage produces: its named tokenizer's size, else the BPE's ``vocab_size``."""
    if tokenizer:
        from models.tokenizer import Tokenizer

        try:
            return Tokenizer.load(tokenizer).n_vocab
        except Exception as e:  # a path that is not here, or a named encoding not installed
            raise ValueError(
                f"data.tokenizer={tokenizer!r} cannot be loaded here ({e}); pass model.vocab_size=N "
                "to plan with a given vocabulary"
            ) from None
    return vocab_size


def run_shape(config: str, overrides: Mapping[str, Any] | None = None, data_section: Any = None) -> RunShape:
    """The run ``genloop pretrain --config CONFIG key=value ...`` would start: its typed, validated pretrain section
    (``overrides`` applied), the model ``pipelines.pretrain.config.model_config`` builds from it (or ``init_from``'s
    checkpoint's) for the vocabulary of ``data`` when given, else of what the preset's data stage produces
    (``data_section``: the preset's typed ``data:`` section, with ``seq_len``, ``tokenizer`` and ``vocab_size``; the
    caller builds it, since stages do not import each other), and seq_len defaulting to the dataset's (the data
    stage's) block length."""
    from pipelines.config import build_config
    from pipelines.pretrain.config import PretrainConfig, model_config

    pcfg = build_config(PretrainConfig, "pretrain", config, dict(overrides or {}))
    if pcfg.data:  # a tokenized dataset given: its block length and tokenizer, as pretrain would use them
        from pipelines.blocks import open_dataset

        info = open_dataset(pcfg.data)
        seq_len = pcfg.seq_len or info.seq_len
        n_vocab = info.load_tokenizer().n_vocab
    else:
        if data_section is None:
            raise ValueError(
                "planning without pretrain.data needs the preset's data section (seq_len, tokenizer, "
                "vocab_size): pass data_section, or give a tokenized dataset with data=DIR"
            )
        dcfg = data_section
        seq_len = pcfg.seq_len or dcfg.seq_len
        n_vocab = pcfg.model.vocab_size or _vocab_from_data(dcfg.tokenizer, dcfg.vocab_size)
    if pcfg.init_from:  # domain fine-tuning: the checkpoint's architecture
        from models.checkpoint import load_config
        from pipelines.artifacts import checkpoint_dir, resolve_checkpoint

        mcfg = load_config(checkpoint_dir(resolve_checkpoint(pcfg.init_from)))
        if seq_len > mcfg.max_seq_len:
            raise ValueError(f"seq_len={seq_len} exceeds the checkpoint's max_seq_len={mcfg.max_seq_len}")
    else:
        mcfg = model_config(pcfg, n_vocab, seq_len)
    tc = pcfg.train
    tc.validate()
    name = f"checkpoint {pcfg.init_from}" if pcfg.init_from else pcfg.model.preset
    return RunShape(
        model=mcfg,
        model_name=name,
        seq_len=seq_len,
        micro_batch_size=tc.micro_batch_size,
        grad_accum=tc.accum_steps(tc.num_workers),
        num_workers=tc.num_workers,
        cpus_per_worker=tc.cpus_per_worker,
        strategy="fsdp" if tc.strategy == "fsdp" else "ddp",
        activation_checkpointing=tc.activation_checkpointing,
    )


# ---- the plan ------------------------------------------------------------------------------------------------------
@dataclass
class PlanConfig:
    """``genloop plan``'s own settings (the run's shape comes from the preset)."""

    tokens: float = 0.0  # training tokens; 0 = compute-optimal (20 per parameter)
    gpu: str = "h100"  # a GPUS key, or cpu
    gpus: int = 0  # 0 = the preset's train.num_workers
    mfu: float = 0.4  # model FLOPs utilisation assumed for throughput
    price_per_gpu_hour: float = 0.0  # USD; 0 = no cost figure
    usable_memory: float = 0.9  # share of a GPU's memory a plan may fill (CUDA context, NCCL, allocator slack)

    def validate(self) -> None:
        if self.tokens < 0:
            raise ValueError(f"tokens={self.tokens:g} must be >= 0 (0 = compute-optimal)")
        if not 0 < self.mfu <= 1:
            raise ValueError(f"mfu={self.mfu} must be in (0, 1]; 0.3-0.5 is typical for dense LLM pretraining")
        if self.gpus < 0:
            raise ValueError(f"gpus={self.gpus} must be >= 0 (0 = the preset's train.num_workers)")
        if self.price_per_gpu_hour < 0:
            raise ValueError(f"price_per_gpu_hour={self.price_per_gpu_hour} must be >= 0")
        if not 0 < self.usable_memory <= 1:
            raise ValueError(f"usable_memory={self.usable_memory} must be in (0, 1]")


def throughput(cfg: ModelConfig, seq_len: int, gpus: int, peak_flops: float, mfu: float) -> float:
    """Tokens/s of ``gpus`` devices at ``mfu``: mfu x peak x gpus / training FLOPs per token."""
    return mfu * peak_flops * gpus / cfg.flops_per_token(seq_len)


def make_plan(shape: RunShape, pc: PlanConfig, gpu: GpuSpec | None = None) -> dict[str, Any]:
    """The whole plan as a JSON-ready dict (bytes, FLOPs, seconds; the formatter rounds)."""
    pc.validate()
    cfg = shape.model
    gpu = gpu or gpu_spec(pc.gpu, shape.cpus_per_worker)
    gpus = pc.gpus or shape.num_workers
    optimal = compute_optimal_tokens(cfg)
    tokens = pc.tokens or optimal
    flops = training_flops(cfg, shape.seq_len, tokens)
    mixed = pc.gpu.lower() != CPU
    cap = gpu.memory_bytes * pc.usable_memory
    memory: dict[str, Any] = {}
    fewest: dict[str, Any] = {}
    for strat in ("ddp", "fsdp"):
        for ckpt in (False, True):
            key = f"{strat}{'_ckpt' if ckpt else ''}"
            memory[key] = memory_per_gpu(cfg, shape.seq_len, shape.micro_batch_size, gpus, strat, ckpt, mixed)
            fewest[key] = fewest_gpus(cfg, shape.seq_len, shape.micro_batch_size, strat, ckpt, cap, mixed)
    chosen = f"{shape.strategy}{'_ckpt' if shape.activation_checkpointing else ''}"
    tps = throughput(cfg, shape.seq_len, gpus, gpu.peak_flops, pc.mfu)
    seconds = tokens / tps
    gpu_hours = gpus * seconds / 3600
    return {
        "model": {"preset": shape.model_name, **dataclasses.asdict(cfg)},
        "run": {
            "seq_len": shape.seq_len,
            "micro_batch_size": shape.micro_batch_size,
            "grad_accum": shape.grad_accum,
            "strategy": shape.strategy,
            "activation_checkpointing": shape.activation_checkpointing,
            "global_batch_tokens": shape.global_batch_tokens(gpus),
        },
        "gpu": {"key": pc.gpu.lower(), **dataclasses.asdict(gpu)},
        "gpus": gpus,
        "params": param_counts(cfg),
        "tokens": tokens,
        "tokens_per_param": tokens / cfg.num_params(),
        "compute_optimal_tokens": optimal,
        "flops_per_token": cfg.flops_per_token(shape.seq_len),
        "training_flops": flops,
        "memory_per_gpu": memory,
        "usable_bytes_per_gpu": cap,
        "fewest_gpus": fewest,
        "chosen": chosen,
        "fits": memory[chosen]["total"] <= cap,
        "mfu": pc.mfu,
        "tokens_per_s": tps,
        "tokens_per_s_per_gpu": tps / gpus,
        "steps": tokens / shape.global_batch_tokens(gpus),
        "seconds": seconds,
        "days": seconds / 86400,
        "gpu_hours": gpu_hours,
        "price_per_gpu_hour": pc.price_per_gpu_hour,
        "cost_usd": gpu_hours * pc.price_per_gpu_hour if pc.price_per_gpu_hour else None,
    }


def predict(
    model_cfg: ModelConfig,
    seq_len: int,
    micro_batch: int,
    world: int,
    gpu: str,
    strategy: Strategy = "fsdp",
    activation_checkpointing: bool = False,
    mfu: float = 0.4,
    cpu_threads: int | None = None,
) -> dict[str, Any]:
    """What a run should see, for ``genloop pretrain`` to log at start beside what it measures at the end:
    ``tokens_per_s`` (all ranks, at ``mfu``), ``memory`` (bytes per rank by part, with ``total``), ``peak_flops``."""
    spec = gpu_spec(gpu, cpu_threads)
    strat: Strategy = "fsdp" if strategy == "fsdp" else "ddp"
    mem = memory_per_gpu(
        model_cfg, seq_len, micro_batch, world, strat, activation_checkpointing, mixed_precision=gpu.lower() != CPU
    )
    return {
        "tokens_per_s": throughput(model_cfg, seq_len, world, spec.peak_flops, mfu),
        "memory": mem,
        "peak_flops": spec.peak_flops,
        "mfu": mfu,
        "gpu": spec.name,
    }


def run_device(use_gpu: bool) -> str | None:
    """The table key for the GPUs a Ray cluster advertises (``accelerator_type:H100``), ``cpu`` without GPUs, None
    for a GPU type not in the table."""
    if not use_gpu:
        return CPU
    import ray

    for res in ray.cluster_resources():
        if res.startswith("accelerator_type:") and (key := gpu_key_for_device(res.split(":", 1)[1])):
            return key
    return None


def predict_run(model_cfg: ModelConfig, seq_len: int, train: Any, use_gpu: bool) -> dict[str, Any] | None:
    """``predict`` for a training loop config (``micro_batch_size``, ``num_workers``, ``strategy``,
    ``activation_checkpointing``, ``cpus_per_worker``) on the cluster's device; None for an unknown GPU type."""
    device = run_device(use_gpu)
    if device is None:
        return None
    return predict(
        model_cfg,
        seq_len,
        train.micro_batch_size,
        train.num_workers,
        device,
        "fsdp" if train.strategy == "fsdp" else "ddp",
        train.activation_checkpointing,
        cpu_threads=train.cpus_per_worker,
    )


def prediction_summary(
    pred: dict[str, Any] | None, tokens_per_s: float | None = None, peak_memory_bytes: float | None = None
) -> str:
    """One log line: the plan's tokens/s and memory per rank, and beside them what a run measured (when given)."""
    if pred is None:
        return "no prediction (GPU type not in pipelines/train/metrics.py GPUS)"
    mem = pred["memory"]["total"]
    out = (
        f"predicted {pred['tokens_per_s']:,.0f} tokens/s at {100 * pred['mfu']:.0f}% MFU of {pred['gpu']}, "
        f"{mem / GB:.2f} GB per rank"
    )
    if tokens_per_s:
        out += f"; measured {tokens_per_s:,.0f} tokens/s ({tokens_per_s / pred['tokens_per_s']:.2f}x)"
    if peak_memory_bytes:
        out += f", peak {peak_memory_bytes / GB:.2f} GB per rank ({peak_memory_bytes / mem:.2f}x)"
    return out


# ---- text ----------------------------------------------------------------------------------------------------------
def _num(x: float) -> str:
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.2f}{unit}"
    return f"{x:.0f}"


def _gb(x: float) -> str:
    return f"{x / GB:.2f} GB"


def format_plan(p: dict[str, Any]) -> str:
    """The plan as the text ``genloop plan`` prints."""
    m, r, pr, g = p["model"], p["run"], p["params"], p["gpu"]
    lines = [
        f"model {m['preset'] or '(custom)'}: dim {m['dim']}, {m['n_layers']} layers, {m['n_heads']} heads "
        f"({m['n_kv_heads']} kv), ffn {m['ffn_hidden']}, vocab {m['vocab_size']}",
        f"parameters: {_num(pr['total'])} total = {_num(pr['non_embedding'])} non-embedding + "
        f"{_num(pr['embedding'])} embedding",
        f"run: seq_len {r['seq_len']}, micro-batch {r['micro_batch_size']}, grad_accum {r['grad_accum']}, "
        f"{r['strategy']}{' + activation checkpointing' if r['activation_checkpointing'] else ''}, "
        f"{p['gpus']} x {g['name']} ({_num(g['peak_flops'])}FLOP/s {'fp32 measured' if g['key'] == CPU else 'bf16 dense'}"
        f", {_gb(g['memory_bytes'])})",
        f"tokens: {_num(p['tokens'])} ({p['tokens_per_param']:.1f} per parameter; compute-optimal "
        f"~{_num(p['compute_optimal_tokens'])} at {CHINCHILLA_TOKENS_PER_PARAM:.0f}/param)",
        f"training FLOPs: {p['training_flops']['total']:.3e} = 6ND {p['training_flops']['dense_6nd']:.3e} (N = "
        f"{_num(pr['matmul'])} matmul weights; the output projection "
        f"{100 * p['training_flops']['output_head'] / p['training_flops']['total']:.1f}% of the total) + "
        f"attention {p['training_flops']['attention']:.3e} ({p['flops_per_token']:.3e} per token)",
        "",
        f"memory per GPU at {p['gpus']} GPUs (GB; usable {_gb(p['usable_bytes_per_gpu'])}):",
    ]
    cols = [("ddp", "DDP"), ("ddp_ckpt", "DDP+ckpt"), ("fsdp", "FSDP2"), ("fsdp_ckpt", "FSDP2+ckpt")]
    parts = [
        ("params", "parameters"),
        ("grads", "gradients"),
        ("optimizer", "AdamW states"),
        ("comm_buffers", "DDP buckets"),
        ("gathered", "FSDP2 gathered"),
        ("activations", "activations"),
        ("loss_head", "logits/loss"),
        ("total", "total"),
    ]
    lines.append(f"  {'':16s}" + "".join(f"{h:>12s}" for _, h in cols))
    for key, label in parts:
        lines.append(f"  {label:16s}" + "".join(f"{p['memory_per_gpu'][c][key] / GB:12.2f}" for c, _ in cols))
    lines.append(
        f"  {'fewest GPUs':16s}"
        + "".join(f"{(str(p['fewest_gpus'][c]) if p['fewest_gpus'][c] else 'no fit'):>12s}" for c, _ in cols)
    )
    chosen_total = p["memory_per_gpu"][p["chosen"]]["total"]
    fit = "fits" if p["fits"] else "DOES NOT FIT: raise --gpus, lower micro_batch_size or turn on checkpointing"
    lines += [
        f"  this run ({p['chosen']}): {_gb(chosen_total)} per GPU, {fit}",
        "",
        f"throughput at {100 * p['mfu']:.0f}% MFU: {_num(p['tokens_per_s'])} tokens/s "
        f"({_num(p['tokens_per_s_per_gpu'])} per GPU), {_num(p['steps'])} steps of "
        f"{_num(r['global_batch_tokens'])} tokens",
        f"wall clock: {p['days']:.1f} days ({p['seconds'] / 3600:.1f} h); {p['gpu_hours']:,.0f} GPU-hours",
    ]
    if r["strategy"] == "ddp" and g["key"] != CPU:
        lines.append(
            "note: genloop's DDP computes in fp32 (no autocast), below the bf16 peak this MFU is taken of; "
            "train.strategy=fsdp trains in bf16 mixed precision"
        )
    if p["cost_usd"] is not None:
        lines.append(f"cost: ${p['cost_usd']:,.0f} at ${p['price_per_gpu_hour']:.2f}/GPU-hour")
    else:
        lines.append("cost: pass --price-per-gpu-hour for a figure")
    return "\n".join(lines)

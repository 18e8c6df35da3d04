"""``genloop sft``: instruction fine-tuning of a checkpoint, loss on assistant tokens only, optional LoRA.

Data: JSONL lines of ``{"messages": [{"role", "content"}, ...]}`` (system/user/assistant, multi-turn) or
``{"prompt", "response"[, "system"]}``, a file or a ``genloop sft-data`` folder, local or ``s3://``. Each conversation
is rendered with the checkpoint's own chat template (``models/chat.py``) and becomes training rows of ``seq_len``
positions, packed or padded (``pipelines/sft/rows.py``; both give the same loss, ``bench/sft_packing_bench.py``
measures which is faster). The base model and the tuned one are evaluated the same way before and after
(``pipelines/sft/evaluate.py``: held-out answer loss, greedy answers, parse rate); training is the shared loop
(``pipelines/train/loop.py``).

The artifact ``--out`` (local or URI): ``manifest.json``, ``model/`` (merged HF checkpoint) and/or ``adapter/`` (PEFT),
``samples.jsonl`` (before/after answers), the loop's metrics and checkpoints. Re-running the same command continues
an unfinished run; ``--overwrite`` clears a finished one and trains afresh (``pipelines/lifecycle.py``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal

import numpy as np

from models.chat import ChatFormat
from models.lora import LoraConfig
from pipelines.artifacts import checkpoint_dir, exists, is_dir, join, resolve_checkpoint, writable_dir, write_text
from pipelines.conversations import read_conversations, split_conversations
from pipelines.lifecycle import absolute_paths, begin_stage
from pipelines.sft.data import train_path, val_path
from pipelines.sft.evaluate import StepEval, eval_prompts, evaluate
from pipelines.sft.rows import cap_rows, encode_samples, fill_ratio, make_rows
from pipelines.train.loop import IGNORE, TrainLoopConfig, fit

log = logging.getLogger(__name__)

__all__ = ["SftConfig", "SftEvalConfig", "build_model", "export_sft", "read_conversations", "run"]


@dataclass
class SftEvalConfig:
    prompts: int = 16  # held-out prompts answered (greedy) before and after SFT
    max_new_tokens: int = 64
    max_rows: int = 64  # held-out rows for the before/after answer loss (0 = all)
    step_prompts: int = 0  # prompts also answered at every eval step of the loop (parse rate per step); 0 = off


@dataclass
class SftConfig:
    init_from: str = ""  # checkpoint folder or URI (HF format, from pretrain), or the artifact holding model/
    data: str = ""  # JSONL: {"messages": [...]} or {"prompt", "response"}; or a `genloop sft-data` folder
    val_data: str = ""  # held-out JSONL; "" = <data>.val.jsonl when it exists, else val_fraction of data
    val_fraction: float = 0.05
    out: str = ""
    train_on: Literal["assistant", "all"] = "assistant"
    pack: bool = True  # several samples per row (measured faster: bench/sft_packing_bench.py)
    seq_len: int = 0  # positions per row; 0 = the checkpoint's max_seq_len
    overlong: Literal["cut", "drop"] = "cut"
    max_samples: int = 0  # 0 = all
    export: Literal["merged", "peft", "both"] = "merged"  # peft/both need lora.rank > 0
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainLoopConfig = field(default_factory=lambda: TrainLoopConfig(name="sft", lr=1e-4, min_lr=1e-5))
    eval: SftEvalConfig = field(default_factory=SftEvalConfig)
    in_process: bool = False  # run the loop in this process (strategy none, one worker) instead of Ray Train
    seed: int = 0
    overwrite: bool = False


def build_model(init_from: str, lora: LoraConfig) -> Any:
    """The loop's model factory (runs on every worker): the checkpoint (fetched once per node when remote),
    LoRA-wrapped when ``lora.rank > 0``."""
    from models.checkpoint import load_checkpoint
    from models.lora import apply_lora

    model, _ = load_checkpoint(checkpoint_dir(init_from))
    if lora.rank > 0:
        apply_lora(model, lora)
    return model


def export_sft(model: Any, state_dict: dict, out: str, init_from: str, kind: str, lora: LoraConfig) -> str:
    """The loop's export (rank 0): a merged HF checkpoint ``<out>/model`` and/or a PEFT adapter ``<out>/adapter``
    (``out`` local or URI)."""
    from models.checkpoint import load_tokenizer, save_checkpoint
    from models.lora import merge_state_dict, save_peft_adapter

    tok = load_tokenizer(checkpoint_dir(init_from))
    target = join(out, "model")
    if kind in ("merged", "both"):
        sd = merge_state_dict(state_dict, lora.scaling) if lora.rank > 0 else state_dict
        with writable_dir(target) as local:
            save_checkpoint(model, tok, local, state_dict=sd)  # only model.cfg is read; the weights are ``sd``
    if kind in ("peft", "both"):
        target = join(out, "adapter")
        with writable_dir(target) as local:
            save_peft_adapter(model, lora, local, base_model=init_from, state_dict=state_dict)
    return target


def _to_dataset(rows: dict[str, np.ndarray]) -> Any:
    import ray.data

    n = len(rows["input_ids"])
    return ray.data.from_items([{k: v[i] for k, v in rows.items()} for i in range(n)])


def _inputs(cfg: SftConfig) -> tuple[str, str]:
    """(train file, held-out file or "") for ``--data`` (a file or an sft-data folder) and ``--val-data``."""
    data_file = train_path(cfg.data) if is_dir(cfg.data) else cfg.data
    if not exists(data_file):
        raise FileNotFoundError(f"--data {cfg.data}: no {data_file}; make it with `genloop sft-data --out {cfg.data}`")
    if cfg.val_data:
        if not exists(cfg.val_data):
            raise FileNotFoundError(f"--val-data {cfg.val_data} does not exist")
        return data_file, cfg.val_data
    return data_file, val_path(cfg.data) if exists(val_path(cfg.data)) else ""


def run(cfg: SftConfig) -> dict:
    """Render, mask and pack the data, evaluate the base model, train with the shared loop on the running Ray (the
    caller starts it), evaluate again."""
    from models.checkpoint import load_checkpoint, load_config, load_tokenizer

    for key in ("init_from", "data", "out"):
        if not getattr(cfg, key):
            raise ValueError(f"sft needs --{key.replace('_', '-')} (config key {key})")
    if cfg.export in ("peft", "both") and cfg.lora.rank <= 0:
        raise ValueError(f"export={cfg.export} writes a LoRA adapter: set --lora-rank R (> 0) or export=merged")
    cfg = absolute_paths(cfg, "init_from", "data", "val_data", "out")
    cfg = dataclasses.replace(cfg, init_from=resolve_checkpoint(cfg.init_from))
    data_file, val_file = _inputs(cfg)
    ckpt = checkpoint_dir(cfg.init_from)  # a local folder (the cached download when init_from is remote)
    mcfg = load_config(ckpt)
    seq_len = cfg.seq_len or mcfg.max_seq_len
    if seq_len > mcfg.max_seq_len:
        raise ValueError(f"seq_len={seq_len} exceeds the checkpoint's max_seq_len={mcfg.max_seq_len}; lower seq_len")
    artifact = begin_stage(
        "sft",
        cfg.out,
        cfg,
        inputs={"--init-from": cfg.init_from, "--data": cfg.data, "--val-data": val_file},
        overwrite=cfg.overwrite,
    )
    tok = load_tokenizer(ckpt)
    fmt = ChatFormat.from_checkpoint(ckpt)

    # ---- data: conversations -> samples -> rows
    counts: Counter = Counter()
    train_convs = read_conversations(data_file, counts)
    if val_file:
        val_counts: Counter = Counter()
        val_convs = read_conversations(val_file, val_counts)
        counts.update({f"val_{k}": v for k, v in val_counts.items()})
    else:
        train_convs, val_convs = split_conversations(train_convs, cfg.val_fraction, cfg.seed)
    if cfg.max_samples:
        train_convs = train_convs[: cfg.max_samples]
    samples = encode_samples([m for m, _ in train_convs], tok, fmt, seq_len, cfg.train_on, cfg.overlong, counts)
    sample_counts: Counter = Counter()
    val_samples = encode_samples([m for m, _ in val_convs], tok, fmt, seq_len, "assistant", cfg.overlong, sample_counts)
    counts.update({f"val_{k}": v for k, v in sample_counts.items()})
    if not samples:
        raise ValueError(f"{cfg.data}: no usable training sample ({dict(counts)}); check the file's format")
    random.Random(cfg.seed).shuffle(samples)
    rows = make_rows(samples, seq_len, tok.pad_id, cfg.pack)
    val_rows = make_rows(val_samples, seq_len, tok.pad_id, cfg.pack) if val_samples else None
    counts.update(
        train_rows=len(rows["input_ids"]),
        val_rows=len(val_rows["input_ids"]) if val_rows else 0,
        answer_tokens=int((rows["labels"] != IGNORE).sum()),
    )
    fill = fill_ratio(rows, samples)
    log.info(
        "sft data: %d samples -> %d rows of %d (%s, fill %.1f%%); held-out %d samples; %s",
        len(samples),
        len(rows["input_ids"]),
        seq_len,
        "packed" if cfg.pack else "padded",
        100 * fill,
        len(val_samples),
        {k: v for k, v in counts.items() if k.startswith(("bad_", "cut_", "dropped_", "val_bad", "val_dropped"))},
    )

    need = cfg.train.micro_batch_size * cfg.train.accum_steps(1) if cfg.in_process else cfg.train.global_rows()
    if len(rows["input_ids"]) < need:
        raise ValueError(
            f"{cfg.data}: {len(samples)} samples make {len(rows['input_ids'])} rows, fewer than one "
            f"global batch ({need} rows); add data or lower train.micro_batch_size / train.grad_accum"
        )

    # ---- before
    prompts = eval_prompts(val_convs or train_convs, cfg.eval.prompts, cfg.seed)
    base, _ = load_checkpoint(ckpt)
    eval_rows = cap_rows(val_rows if val_rows else rows, cfg.eval.max_rows)
    before = evaluate(base, tok, fmt, eval_rows, prompts, cfg.eval.max_new_tokens)
    del base
    log.info("before SFT: held-out answer loss %.4f, parse rate %s", before.answer_loss, before.parse_rate)

    # ---- train (the shared loop)
    loop = cfg.train
    if cfg.in_process:
        loop = dataclasses.replace(loop, strategy="none", num_workers=1)
    hook = (
        StepEval(cfg.init_from, prompts[: cfg.eval.step_prompts], cfg.eval.max_new_tokens)
        if cfg.eval.step_prompts > 0
        else None
    )
    t0 = time.perf_counter()
    result = fit(
        loop,
        partial(build_model, cfg.init_from, cfg.lora),
        _to_dataset(rows),
        _to_dataset(val_rows) if val_rows else None,
        cfg.out,
        export=partial(export_sft, init_from=cfg.init_from, kind=cfg.export, lora=cfg.lora),
        eval_hook=hook,
        in_process=cfg.in_process,
    )
    train_s = time.perf_counter() - t0

    # ---- after
    if cfg.export in ("merged", "both"):
        tuned, _ = load_checkpoint(checkpoint_dir(join(cfg.out, "model")))
    else:
        from models.lora import load_peft_adapter
        from pipelines.artifacts import local_copy

        tuned, _ = load_checkpoint(ckpt)
        load_peft_adapter(tuned, local_copy(join(cfg.out, "adapter")))
    after = evaluate(tuned, tok, fmt, eval_rows, prompts, cfg.eval.max_new_tokens)
    log.info("after SFT: held-out answer loss %.4f, parse rate %s", after.answer_loss, after.parse_rate)
    write_text(
        join(cfg.out, "samples.jsonl"),
        "".join(
            json.dumps(
                {"prompt": b["prompt"], "reference": b["reference"], "before": b["generated"], "after": a["generated"]},
                ensure_ascii=False,
            )
            + "\n"
            for b, a in zip(before.samples, after.samples)
        ),
    )
    metrics = {
        "heldout_answer_loss_before": before.answer_loss,
        "heldout_answer_loss_after": after.answer_loss,
        "parse_rate_before": before.parse_rate,
        "parse_rate_after": after.parse_rate,
        "fill_ratio": fill,
        "train_seconds": train_s,
        "steps": result.steps,
        **result.final_metrics(),
    }
    artifact.finish(counts=dict(counts), metrics=metrics)
    return {"out": cfg.out, "model": result.model_dir, **metrics, "counts": dict(counts)}

"""Pretraining and domain fine-tuning on Ray Train (DDP | FSDP2): ``genloop pretrain``.

::

    genloop pretrain --data DATA_DIR --model tiny --out runs/pt [--strategy ddp|fsdp] [--num-workers N] [--use-gpu]
    genloop pretrain --config domain --data DOMAIN_DATA --init-from runs/pt/model --out runs/domain

Input: a tokenized dataset folder (``pipelines/blocks.py``). Each ``tokens`` block of seq_len + 1 ids becomes one
training row ``input_ids = tokens[:-1]``, ``labels = tokens[1:]`` (cropped to ``seq_len`` when that is shorter).

The artifact folder ``--out``::

    manifest.json               stage "pretrain": config, inputs (data, init_from), counts (steps, tokens), metrics
    model/                      the Hugging Face folder (config.json, model.safetensors, tokenizer files): what
                                ``--init-from``, SFT, RLHF and serving take. ``--init-from`` also accepts ``--out``
                                itself (the folder holding ``model/``).
    metrics.jsonl, metrics.csv  loss, lr, grad_norm, tokens_per_s, mfu every log_every; val_loss / val_ppl
    loss_curve.png
    train_runs/<name>/step_*/   resumable training checkpoints (torch distributed checkpoint, sharded under FSDP);
                                re-running the same command resumes an unfinished run from the newest;
                                ``--overwrite`` clears the artifact and starts afresh (``pipelines/lifecycle.py``)

The loop itself is ``pipelines/train/loop.py`` (shared with SFT).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from models.tokenizer import tokenizers_match
from models.transformer import ModelConfig, Transformer
from pipelines.artifacts import exists
from pipelines.blocks import TOKENS, BlocksInfo, open_dataset
from pipelines.lifecycle import absolute_paths, begin_stage
from pipelines.pretrain.config import PretrainConfig, model_config
from pipelines.train.loop import FitResult, check_placement, fit, hf_export

log = logging.getLogger(__name__)


# ---- pure helpers --------------------------------------------------------------------------------------------------
def lm_rows(batch: dict[str, np.ndarray], seq_len: int) -> dict[str, np.ndarray]:
    """``tokens`` (N, >= seq_len + 1) -> ``input_ids`` = tokens[:, :seq_len], ``labels`` = tokens[:, 1:seq_len + 1]."""
    tokens = batch[TOKENS]
    if tokens.dtype == object:
        tokens = np.stack(tokens)
    tokens = tokens.astype(np.int32)
    return {"input_ids": tokens[:, :seq_len], "labels": tokens[:, 1 : seq_len + 1]}


def resolve_seq_len(requested: int, info: BlocksInfo) -> int:
    if requested <= 0:
        return info.seq_len
    if requested > info.seq_len:
        raise ValueError(
            f"seq_len={requested} is longer than the blocks of --data {info.path} ({info.seq_len} tokens "
            f"+ 1); lower seq_len or re-run `genloop data` with seq_len={requested}"
        )
    return requested


# ---- the stage -----------------------------------------------------------------------------------------------------
@dataclass
class Plan:
    """Everything checked up front, before Ray or any worker starts."""

    info: BlocksInfo
    seq_len: int
    model_cfg: ModelConfig
    init_from: str | None


def plan(config: PretrainConfig) -> Plan:
    """Validate the inputs (clear one-line errors) and settle the model config."""
    if not config.data:
        raise ValueError("no --data: pass a tokenized dataset folder made by `genloop data`")
    if not config.out:
        raise ValueError("no --out: pass the folder to write the model and metrics to")
    config.train.validate()
    info = open_dataset(config.data)
    if info.train_blocks and info.train_blocks < config.train.global_rows():
        raise ValueError(
            f"--data {info.path} has {info.train_blocks} training blocks, fewer than one global batch "
            f"({config.train.global_rows()} = micro_batch_size x grad_accum x num_workers); lower them"
        )
    seq_len = resolve_seq_len(config.seq_len, info)
    data_tok = info.load_tokenizer()  # downloaded once into the local cache when --data is remote
    if config.init_from:
        from models.checkpoint import load_config, load_tokenizer
        from pipelines.artifacts import checkpoint_dir, resolve_checkpoint

        ckpt = resolve_checkpoint(config.init_from)  # local or URI; workers fetch their own copy (_builder)
        ckpt_tok = load_tokenizer(checkpoint_dir(ckpt))
        if not tokenizers_match(ckpt_tok, data_tok):
            raise ValueError(
                f"--init-from {ckpt} uses tokenizer {ckpt_tok.name!r} ({ckpt_tok.n_vocab} tokens) but "
                f"--data {info.path} was tokenized with {data_tok.name!r} ({data_tok.n_vocab} tokens); "
                "re-tokenize the data with the checkpoint's tokenizer"
            )
        mcfg = load_config(checkpoint_dir(ckpt))
        if seq_len > mcfg.max_seq_len:
            raise ValueError(
                f"seq_len={seq_len} exceeds the checkpoint's max_seq_len={mcfg.max_seq_len}; "
                f"set seq_len={mcfg.max_seq_len} or lower"
            )
        return Plan(info, seq_len, mcfg, ckpt)
    return Plan(info, seq_len, model_config(config, data_tok.n_vocab, seq_len), None)


def _builder(p: Plan):
    """The model factory that runs on every worker (the loop seeds torch first, so ranks agree)."""
    mcfg, init_from = p.model_cfg, p.init_from

    def build() -> Transformer:
        if init_from:
            from models.checkpoint import load_checkpoint
            from pipelines.artifacts import checkpoint_dir

            return load_checkpoint(checkpoint_dir(init_from))[0]
        return Transformer(mcfg)

    return build


def datasets(p: Plan):
    """(train, val) Ray Datasets of ``input_ids`` / ``labels`` rows; val is None when the split is empty."""
    import ray.data

    def read(path: str):
        return ray.data.read_parquet(path, columns=[TOKENS]).map_batches(
            lm_rows, fn_kwargs={"seq_len": p.seq_len}, batch_format="numpy"
        )

    val = read(p.info.val) if p.info.val_blocks > 0 and exists(p.info.val) else None
    return read(p.info.train), val


def run(config: PretrainConfig) -> FitResult:
    """Train into ``config.out`` on the Ray runtime the caller started (``genloop pretrain`` does)."""
    from pipelines.runtime import use_gpu_default

    config = absolute_paths(config, "data", "out", "init_from")
    p = plan(config)
    tc = config.train
    use_gpu = use_gpu_default() if tc.use_gpu is None else tc.use_gpu
    check_placement(tc, use_gpu)
    artifact = begin_stage(
        "pretrain",
        config.out,
        config,
        inputs={"--data": config.data, "--init-from": p.init_from},
        overwrite=config.overwrite,
    )
    mc = p.model_cfg
    log.info(
        "pretrain: %.2fM params (dim %d, %d layers), seq_len %d, global batch %d rows, %d steps, %s x %d",
        mc.num_params() / 1e6,
        mc.dim,
        mc.n_layers,
        p.seq_len,
        tc.global_rows(),
        tc.steps,
        tc.strategy,
        tc.num_workers,
    )
    from pipelines.pretrain.plan import predict_run, prediction_summary

    pred = predict_run(mc, p.seq_len, tc, use_gpu)  # `genloop plan`'s model of this run, checked against the run
    log.info("plan: %s", prediction_summary(pred))
    train_ds, val_ds = datasets(p)
    result = fit(tc, _builder(p), train_ds, val_ds, config.out, export=hf_export(p.info.tokenizer))
    log.info(
        "plan vs measured: %s",
        prediction_summary(pred, result.metrics.get("tokens_per_s"), result.metrics.get("peak_memory_bytes")),
    )
    tokens = result.steps * tc.global_rows() * p.seq_len
    keep = ("loss", "val_loss", "val_ppl", "tokens_per_s", "mfu", "grad_norm")
    artifact.finish(
        counts={
            "steps": result.steps,
            "tokens": tokens,
            "train_blocks": p.info.train_blocks,
            "params": mc.num_params(),
        },
        metrics={k: result.metrics[k] for k in keep if k in result.metrics},
    )
    return result

"""``genloop sft``: instruction fine-tuning of a checkpoint, loss on assistant tokens only, optional LoRA.

Data: JSONL lines of ``{"messages": [{"role", "content"}, ...]}`` (system/user/assistant, multi-turn) or
``{"prompt", "response"[, "system"]}``. Each conversation is rendered with the checkpoint's own chat template
(``models/chat.py``) and becomes ``(ids, mask)``; a sample of ``n`` tokens gives ``n - 1`` training positions with
``labels[t] = ids[t+1]`` where ``mask[t+1]`` (else -100), so labels are already aligned with the inputs.

Rows handed to the training loop (``pipelines/train_loop.py``) have ``seq_len`` positions:

- ``pack=true``: several samples per row (first-fit by decreasing length); ``position_ids`` restart at 0 per sample and
  ``doc_ids`` (sample index within the row, -1 on the padded tail) keep attention inside a sample.
- ``pack=false``: one sample per row, right-padded with the pad token (labels -100); causal attention as in pretraining.

Both give the same loss for the same samples (tests/test_sft.py); ``bench/sft_packing_bench.py`` measures which is faster.

Bad lines (not JSON, missing fields, unknown roles, non-string content, no assistant turn) are counted and skipped.
A sample longer than ``seq_len + 1`` tokens is cut to its first ``seq_len + 1`` tokens (``overlong=cut``) or dropped
(``overlong=drop``); a cut sample with no assistant token left is dropped. All counted in the manifest.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Literal, Sequence

import numpy as np

from models.checkpoint import resolve_checkpoint
from models.chat import ROLES, ChatError, ChatFormat, Message, encode_chat, encode_prompt
from models.lora import LoraConfig

log = logging.getLogger(__name__)

IGNORE = -100


# ---- reading conversations -----------------------------------------------------------------------------------------

def parse_record(obj: Any) -> tuple[list[Message] | None, str]:
    """(messages, "") for a valid record, else (None, reason) with reason one of the counted drop kinds."""
    if not isinstance(obj, dict):
        return None, "not_an_object"
    if "messages" in obj:
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not msgs:
            return None, "missing_fields"
    elif "prompt" in obj and "response" in obj:
        msgs = ([{"role": "system", "content": obj["system"]}] if obj.get("system") else []) + [
            {"role": "user", "content": obj["prompt"]}, {"role": "assistant", "content": obj["response"]}]
    else:
        return None, "missing_fields"
    out: list[Message] = []
    for m in msgs:
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            return None, "missing_fields"
        if m["role"] not in ROLES:
            return None, "unknown_role"
        if not isinstance(m["content"], str):
            return None, "bad_content"
        out.append({"role": m["role"], "content": m["content"]})
    if not any(m["role"] == "assistant" and m["content"] for m in out):
        return None, "no_assistant_turn"
    return out, ""


def read_conversations(path: str, counts: Counter) -> list[tuple[list[Message], dict]]:
    """[(messages, meta)] from a JSONL file; bad lines counted in ``counts["bad_<reason>"]``, never raised."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"SFT data {path} does not exist; make one with `genloop sft-data --out {path}`")
    rows = []
    with open(p, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            counts["lines"] += 1
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                counts["bad_json"] += 1
                continue
            msgs, reason = parse_record(obj)
            if msgs is None:
                counts[f"bad_{reason}"] += 1
                if counts[f"bad_{reason}"] <= 3:
                    log.warning("%s:%d skipped (%s)", path, n, reason)
                continue
            meta = obj.get("meta") if isinstance(obj.get("meta"), dict) else {}
            rows.append((msgs, meta))
    return rows


# ---- samples: ids + aligned labels ---------------------------------------------------------------------------------

@dataclass
class Sample:
    """One conversation as training positions: ``input_ids[t]`` predicts ``labels[t]`` (-100 = no loss)."""

    input_ids: list[int]
    labels: list[int]


def to_sample(ids: Sequence[int], mask: Sequence[int], seq_len: int, overlong: str, counts: Counter) -> Sample | None:
    """Shift (ids, mask) into (input_ids, labels) of at most ``seq_len`` positions; None if dropped (counted)."""
    if len(ids) > seq_len + 1:
        if overlong == "drop":
            counts["dropped_overlong"] += 1
            return None
        ids, mask = ids[: seq_len + 1], mask[: seq_len + 1]
        counts["cut_overlong"] += 1
    labels = [t if m else IGNORE for t, m in zip(ids[1:], mask[1:])]
    if all(l == IGNORE for l in labels):
        counts["dropped_no_target"] += 1
        return None
    return Sample(list(ids[:-1]), labels)


def encode_samples(convs: Iterable[Sequence[Message]], tok: Any, fmt: ChatFormat, seq_len: int, train_on: str,
                   overlong: str, counts: Counter) -> list[Sample]:
    out = []
    for msgs in convs:
        try:
            ids, mask = encode_chat(tok, fmt, msgs, train_on)
        except ChatError as e:
            counts["bad_template"] += 1
            log.warning("conversation skipped: %s", e)
            continue
        s = to_sample(ids, mask, seq_len, overlong, counts)
        if s is not None:
            out.append(s)
    counts["samples"] += len(out)
    return out


# ---- rows: packing vs padding --------------------------------------------------------------------------------------

def pack_bins(lengths: Sequence[int], capacity: int, window: int = 64) -> list[list[int]]:
    """Sample indices grouped into rows of at most ``capacity`` positions: first-fit by decreasing length, looking
    back over the last ``window`` open rows (O(n * window))."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    bins: list[list[int]] = []
    space: list[int] = []
    for i in order:
        n = lengths[i]
        for b in range(max(0, len(bins) - window), len(bins)):
            if space[b] >= n:
                bins[b].append(i)
                space[b] -= n
                break
        else:
            bins.append([i])
            space.append(capacity - n)
    return bins


def packed_rows(samples: Sequence[Sample], seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """(R, seq_len) arrays ``input_ids``, ``labels``, ``position_ids``, ``doc_ids`` with several samples per row."""
    bins = pack_bins([len(s.input_ids) for s in samples], seq_len)
    R = len(bins)
    ids = np.full((R, seq_len), pad_id, np.int64)
    labels = np.full((R, seq_len), IGNORE, np.int64)
    pos = np.zeros((R, seq_len), np.int64)
    doc = np.full((R, seq_len), -1, np.int64)
    for r, members in enumerate(bins):
        at = 0
        for d, i in enumerate(members):
            n = len(samples[i].input_ids)
            ids[r, at:at + n] = samples[i].input_ids
            labels[r, at:at + n] = samples[i].labels
            pos[r, at:at + n] = np.arange(n)
            doc[r, at:at + n] = d
            at += n
        pos[r, at:] = np.arange(seq_len - at)  # padded tail: its own "document" (-1), never in the loss
    return {"input_ids": ids, "labels": labels, "position_ids": pos, "doc_ids": doc}


def padded_rows(samples: Sequence[Sample], seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """(N, seq_len) arrays ``input_ids``, ``labels``: one sample per row, right-padded."""
    N = len(samples)
    ids = np.full((N, seq_len), pad_id, np.int64)
    labels = np.full((N, seq_len), IGNORE, np.int64)
    for r, s in enumerate(samples):
        n = len(s.input_ids)
        ids[r, :n] = s.input_ids
        labels[r, :n] = s.labels
    return {"input_ids": ids, "labels": labels}


def make_rows(samples: Sequence[Sample], seq_len: int, pad_id: int, pack: bool) -> dict[str, np.ndarray]:
    return packed_rows(samples, seq_len, pad_id) if pack else padded_rows(samples, seq_len, pad_id)


def fill_ratio(rows: dict[str, np.ndarray], samples: Sequence[Sample]) -> float:
    """Share of row positions holding a real token (1 - wasted-position share)."""
    return sum(len(s.input_ids) for s in samples) / max(rows["input_ids"].size, 1)


# ---- loss and evaluation -------------------------------------------------------------------------------------------

def answer_loss_sum(model: Any, batch: dict[str, Any]) -> tuple[float, int]:
    """(sum of token cross-entropies over labels != -100, number of such tokens) for one batch of rows."""
    import torch
    import torch.nn.functional as F

    t = {k: torch.as_tensor(v) for k, v in batch.items()}
    logits = model(t["input_ids"], position_ids=t.get("position_ids"), doc_ids=t.get("doc_ids"))
    loss = F.cross_entropy(logits.float().flatten(0, 1), t["labels"].flatten(), ignore_index=IGNORE, reduction="sum")
    return float(loss), int((t["labels"] != IGNORE).sum())


def heldout_answer_loss(model: Any, rows: dict[str, np.ndarray], batch_size: int = 8) -> float:
    """Mean cross-entropy per answer token over all rows (token-weighted, so packing does not change it)."""
    import torch

    model.eval()
    total, n = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(rows["input_ids"]), batch_size):
            s, k = answer_loss_sum(model, {key: v[i:i + batch_size] for key, v in rows.items()})
            total, n = total + s, n + k
    return total / max(n, 1)


from pipelines.judge import parses_as_python, writes_function  # noqa: E402,F401  (re-exported: tests and callers import them here)


def greedy_cached(model: Any, prompt: Sequence[int], max_new_tokens: int, stop_ids: tuple[int, ...] = ()) -> list[int]:
    """Greedy decoding with a per-layer KV cache, built from the model's own modules (same maths as
    ``Transformer.forward``; tests check it returns ``models.transformer.generate``'s tokens). For plain (unsharded)
    models in this process: before/after evals would otherwise re-run the whole context for every new token.
    ``prompt`` + ``max_new_tokens`` must fit in ``max_seq_len``."""
    import torch
    import torch.nn.functional as F

    from models.transformer import apply_rope, rope_cos_sin

    cfg = model.cfg
    dev = next(model.parameters()).device
    model.eval()
    caches: list[tuple[Any, Any] | None] = [None] * len(model.model.layers)
    x_ids = torch.tensor([list(prompt)], device=dev)  # (1, T) the prompt, then one new token per step
    start, out = 0, []
    with torch.no_grad():
        for _ in range(min(max_new_tokens, cfg.max_seq_len - len(prompt))):
            T = x_ids.shape[1]
            pos = torch.arange(start, start + T, device=dev)[None]  # (1, T)
            x = model.model.embed_tokens(x_ids)  # (1, T, dim)
            cos, sin = rope_cos_sin(pos, cfg.head_dim, cfg.rope_theta, x.dtype)
            for i, layer in enumerate(model.model.layers):
                att, h = layer.self_attn, layer.input_layernorm(x)
                q = att.q_proj(h).view(1, T, att.n_heads, att.head_dim).transpose(1, 2)  # (1, H, T, hd)
                k = att.k_proj(h).view(1, T, att.n_kv_heads, att.head_dim).transpose(1, 2)  # (1, KV, T, hd)
                v = att.v_proj(h).view(1, T, att.n_kv_heads, att.head_dim).transpose(1, 2)
                q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
                if caches[i] is not None:
                    k, v = torch.cat([caches[i][0], k], dim=2), torch.cat([caches[i][1], v], dim=2)
                caches[i] = (k, v)
                rep = att.n_heads // att.n_kv_heads
                kk, vv = (k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)) if rep > 1 else (k, v)
                a = F.scaled_dot_product_attention(q, kk, vv, is_causal=T > 1)  # prefill causal; 1 new token sees all
                x = x + att.o_proj(a.transpose(1, 2).reshape(1, T, -1))
                x = x + layer.mlp(layer.post_attention_layernorm(x))
            logits = model.lm_head(model.model.norm(x[:, -1:]))[0, -1].float()  # (vocab,)
            nxt = int(logits.argmax())
            out.append(nxt)
            if nxt in stop_ids:
                break
            start += T
            x_ids = torch.tensor([[nxt]], device=dev)
    return out


def generate_answers(model: Any, tok: Any, fmt: ChatFormat, prompts: Sequence[Sequence[Message]],
                     max_new_tokens: int, cached: bool = True) -> list[str]:
    """Greedy answers to each prompt conversation, stopping at <|im_end|>. ``cached``: ``greedy_cached`` (plain
    models); otherwise ``models.transformer.generate`` (works on any wrapped/sharded model)."""
    from models.transformer import generate

    stops = (tok.im_end_id, tok.eot_id)
    out = []
    for msgs in prompts:
        ids = encode_prompt(tok, fmt, msgs)[-(model.cfg.max_seq_len - max_new_tokens):]
        gen = greedy_cached(model, ids, max_new_tokens, stops) if cached else \
            generate(model, ids, max_new_tokens, temperature=0.0, stop_ids=stops)
        out.append(tok.decode([i for i in gen if i not in stops]))
    return out


@dataclass
class EvalReport:
    answer_loss: float
    parse_rate: float | None  # share of answers to code-writing prompts that parse and define a function (None: none)
    samples: list[dict]  # [{"prompt", "reference", "generated"}]


def evaluate(model: Any, tok: Any, fmt: ChatFormat, val_rows: dict[str, np.ndarray],
             prompts: Sequence[tuple[list[Message], str, bool]], max_new_tokens: int) -> EvalReport:
    """Held-out answer loss plus greedy answers to ``prompts`` = [(prompt messages, reference, is_code_task)]."""
    loss = heldout_answer_loss(model, val_rows)
    gens = generate_answers(model, tok, fmt, [p for p, _, _ in prompts], max_new_tokens)
    code = [writes_function(g) for g, (_, _, is_code) in zip(gens, prompts) if is_code]
    samples = [{"prompt": p[-1]["content"], "reference": ref, "generated": g} for (p, ref, _), g in zip(prompts, gens)]
    return EvalReport(loss, (sum(code) / len(code)) if code else None, samples)


def eval_prompts(convs: Sequence[tuple[list[Message], dict]], n: int, seed: int) -> list[tuple[list[Message], str, bool]]:
    """Up to ``n`` held-out prompts: the conversation up to its last assistant turn, that turn as the reference.
    Code-writing prompts (sft-data ``task: write``) come first so the parse rate has enough of them."""
    rng = random.Random(seed)
    items = list(convs)
    rng.shuffle(items)
    items.sort(key=lambda c: c[1].get("task") != "write")
    out = []
    for msgs, meta in items[:n]:
        last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
        out.append((msgs[:last], msgs[last]["content"], meta.get("task") == "write"))
    return out


# ---- the stage -----------------------------------------------------------------------------------------------------

from pipelines.train_loop import TrainLoopConfig  # noqa: E402  (after the pure functions above, which tests import)


@dataclass
class SftEvalConfig:
    prompts: int = 16  # held-out prompts answered (greedy) before and after SFT
    max_new_tokens: int = 64
    max_rows: int = 64  # held-out rows for the before/after answer loss (0 = all)
    step_prompts: int = 0  # prompts also answered at every eval step of the loop (parse rate per step); 0 = off


@dataclass
class SftConfig:
    init_from: str = ""  # checkpoint folder (HF format, from pretrain)
    data: str = ""  # JSONL: {"messages": [...]} or {"prompt", "response"}
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
    """The loop's model factory (runs on every worker): the checkpoint, LoRA-wrapped when ``lora.rank > 0``."""
    from models.checkpoint import load_checkpoint
    from models.lora import apply_lora

    model, _ = load_checkpoint(init_from)
    if lora.rank > 0:
        apply_lora(model, lora)
    return model


def export_sft(model: Any, state_dict: dict, out: str, init_from: str, kind: str, lora: LoraConfig) -> str:
    """The loop's export (rank 0): a merged HF checkpoint ``<out>/model`` and/or a PEFT adapter ``<out>/adapter``."""
    from models.checkpoint import load_tokenizer, save_checkpoint
    from models.lora import merge_state_dict, save_peft_adapter

    tok = load_tokenizer(init_from)
    target = str(Path(out, "model"))
    if kind in ("merged", "both"):
        sd = merge_state_dict(state_dict, lora.scaling) if lora.rank > 0 else state_dict
        save_checkpoint(model, tok, target, state_dict=sd)  # only model.cfg is read; the weights are ``sd``
    if kind in ("peft", "both"):
        target = str(save_peft_adapter(model, lora, Path(out, "adapter"), base_model=init_from, state_dict=state_dict))
    return target


class StepEval:
    """The loop's eval hook: greedy answers to a few held-out prompts at each eval step -> parse rate (all ranks run
    it, so FSDP's collectives match; rank 0's numbers are kept)."""

    def __init__(self, init_from: str, prompts: list, max_new_tokens: int) -> None:
        self.init_from, self.prompts, self.max_new_tokens = init_from, prompts, max_new_tokens

    def __call__(self, model: Any, step: int) -> dict:
        from models.checkpoint import load_tokenizer
        from models.parallel import unwrap

        tok = load_tokenizer(self.init_from)
        fmt = ChatFormat.from_checkpoint(self.init_from)
        gens = generate_answers(unwrap(model), tok, fmt, [p for p, _, _ in self.prompts], self.max_new_tokens,
                                cached=False)
        code = [writes_function(g) for g, (_, _, is_code) in zip(gens, self.prompts) if is_code]
        if gens:
            log.info("step %d sample: %r -> %r", step, self.prompts[0][0][-1]["content"][:80], gens[0][:120])
        return {"parse_rate": sum(code) / len(code)} if code else {}


def _split(convs: list, fraction: float, seed: int) -> tuple[list, list]:
    items = list(convs)
    random.Random(seed).shuffle(items)
    n_val = max(1, int(len(items) * fraction)) if fraction > 0 and len(items) > 1 else 0
    return items[n_val:], items[:n_val]


def _to_dataset(rows: dict[str, np.ndarray]) -> Any:
    import ray.data

    n = len(rows["input_ids"])
    return ray.data.from_items([{k: v[i] for k, v in rows.items()} for i in range(n)])


def _cap(rows: dict[str, np.ndarray], n: int) -> dict[str, np.ndarray]:
    return {k: v[:n] for k, v in rows.items()} if n > 0 else rows


def run(cfg: SftConfig, address: str | None = None) -> dict:
    """Render, mask and pack the data, evaluate the base model, train with the shared loop, evaluate again."""
    from functools import partial

    from cluster.runtime import init_ray
    from models.checkpoint import load_checkpoint, load_config, load_tokenizer
    from pipelines.artifacts import Manifest, absolute
    from pipelines.sft_data import train_path, val_path
    from pipelines.train_loop import fit

    for key in ("init_from", "data", "out"):
        if not getattr(cfg, key):
            raise ValueError(f"sft needs --{key.replace('_', '-')} (config key {key})")
    # Ray Train workers run in their own directories: hand them absolute paths
    cfg = dataclasses.replace(cfg, **{k: absolute(getattr(cfg, k)) for k in ("init_from", "data", "out")})
    cfg = dataclasses.replace(cfg, init_from=resolve_checkpoint(cfg.init_from))
    data_file = train_path(cfg.data) if Path(cfg.data).is_dir() else cfg.data
    if cfg.export in ("peft", "both") and cfg.lora.rank <= 0:
        raise ValueError(f"export={cfg.export} writes a LoRA adapter: set --lora-rank R (> 0) or export=merged")
    mcfg = load_config(cfg.init_from)
    seq_len = cfg.seq_len or mcfg.max_seq_len
    if seq_len > mcfg.max_seq_len:
        raise ValueError(f"seq_len={seq_len} exceeds the checkpoint's max_seq_len={mcfg.max_seq_len}; lower seq_len")
    val_file = cfg.val_data or (val_path(cfg.data) if Path(val_path(cfg.data)).exists() else "")
    if not Path(data_file).exists():
        raise FileNotFoundError(f"--data {cfg.data}: no {data_file}; make it with `genloop sft-data --out {cfg.data}`")
    manifest = Manifest.begin("sft", cfg.out, cfg, inputs=[cfg.init_from, cfg.data] + ([val_file] if val_file else []),
                              overwrite=cfg.overwrite)
    tok = load_tokenizer(cfg.init_from)
    fmt = ChatFormat.from_checkpoint(cfg.init_from)

    # ---- data: conversations -> samples -> rows
    counts: Counter = Counter()
    train_convs = read_conversations(data_file, counts)
    if val_file:
        val_counts: Counter = Counter()
        val_convs = read_conversations(val_file, val_counts)
        counts.update({f"val_{k}": v for k, v in val_counts.items()})
    else:
        train_convs, val_convs = _split(train_convs, cfg.val_fraction, cfg.seed)
    if cfg.max_samples:
        train_convs = train_convs[: cfg.max_samples]
    samples = encode_samples([m for m, _ in train_convs], tok, fmt, seq_len, cfg.train_on, cfg.overlong, counts)
    val_counts2: Counter = Counter()
    val_samples = encode_samples([m for m, _ in val_convs], tok, fmt, seq_len, "assistant", cfg.overlong, val_counts2)
    counts.update({f"val_{k}": v for k, v in val_counts2.items()})
    if not samples:
        raise ValueError(f"{cfg.data}: no usable training sample ({dict(counts)}); check the file's format")
    rng = random.Random(cfg.seed)
    rng.shuffle(samples)
    rows = make_rows(samples, seq_len, tok.pad_id, cfg.pack)
    val_rows = make_rows(val_samples, seq_len, tok.pad_id, cfg.pack) if val_samples else None
    counts.update(train_rows=len(rows["input_ids"]), val_rows=len(val_rows["input_ids"]) if val_rows else 0,
                  answer_tokens=int((rows["labels"] != IGNORE).sum()))
    fill = fill_ratio(rows, samples)
    log.info("sft data: %d samples -> %d rows of %d (%s, fill %.1f%%); held-out %d samples; %s", len(samples),
             len(rows["input_ids"]), seq_len, "packed" if cfg.pack else "padded", 100 * fill, len(val_samples),
             {k: v for k, v in counts.items() if k.startswith(("bad_", "cut_", "dropped_", "val_bad", "val_dropped"))})

    need = cfg.train.micro_batch_size * cfg.train.grad_accum * (1 if cfg.in_process else cfg.train.num_workers)
    if len(rows["input_ids"]) < need:
        raise ValueError(f"{cfg.data}: {len(samples)} samples make {len(rows['input_ids'])} rows, fewer than one global "
                         f"batch ({need} rows); add data or lower train.micro_batch_size / train.grad_accum")

    # ---- before
    prompts = eval_prompts(val_convs or train_convs, cfg.eval.prompts, cfg.seed)
    base, _ = load_checkpoint(cfg.init_from)
    eval_rows = _cap(val_rows, cfg.eval.max_rows) if val_rows else _cap(rows, cfg.eval.max_rows)
    before = evaluate(base, tok, fmt, eval_rows, prompts, cfg.eval.max_new_tokens)
    del base
    log.info("before SFT: held-out answer loss %.4f, parse rate %s", before.answer_loss, before.parse_rate)

    # ---- train (the shared loop)
    init_ray(address)
    loop = cfg.train
    if cfg.in_process:
        loop = dataclasses.replace(loop, strategy="none", num_workers=1)
    hook = StepEval(cfg.init_from, prompts[: cfg.eval.step_prompts], cfg.eval.max_new_tokens) \
        if cfg.eval.step_prompts > 0 else None
    t0 = time.perf_counter()
    result = fit(loop, partial(build_model, cfg.init_from, cfg.lora), _to_dataset(rows),
                 _to_dataset(val_rows) if val_rows else None, cfg.out,
                 export=partial(export_sft, init_from=cfg.init_from, kind=cfg.export, lora=cfg.lora),
                 eval_hook=hook, in_process=cfg.in_process)
    train_s = time.perf_counter() - t0

    # ---- after
    if cfg.export in ("merged", "both"):
        tuned, _ = load_checkpoint(Path(cfg.out, "model"))
    else:
        from models.lora import load_peft_adapter

        tuned, _ = load_checkpoint(cfg.init_from)
        load_peft_adapter(tuned, Path(cfg.out, "adapter"))
    after = evaluate(tuned, tok, fmt, eval_rows, prompts, cfg.eval.max_new_tokens)
    log.info("after SFT: held-out answer loss %.4f, parse rate %s", after.answer_loss, after.parse_rate)
    with open(Path(cfg.out, "samples.jsonl"), "w") as f:
        for b, a in zip(before.samples, after.samples):
            f.write(json.dumps({"prompt": b["prompt"], "reference": b["reference"], "before": b["generated"],
                                "after": a["generated"]}, ensure_ascii=False) + "\n")
    metrics = {
        "heldout_answer_loss_before": before.answer_loss, "heldout_answer_loss_after": after.answer_loss,
        "parse_rate_before": before.parse_rate, "parse_rate_after": after.parse_rate,
        "fill_ratio": fill, "train_seconds": train_s, "steps": result.steps,
        **{f"final_{k}": v for k, v in result.metrics.items() if isinstance(v, (int, float)) and k != "step"},
    }
    manifest.finish(counts=dict(counts), metrics=metrics)
    return {"out": cfg.out, "model": result.model_dir, **metrics, "counts": dict(counts)}

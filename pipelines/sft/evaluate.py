"""SFT evaluation: held-out answer loss (token-weighted, so packing does not change it) and greedy answers to held-out
prompts -> the parse rate (answers to code-writing prompts that parse and define a function, ``pipelines.judge``).
Plain functions on a plain model; ``StepEval`` is the training loop's per-eval-step hook."""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from models.chat import ChatFormat, Message, encode_prompt
from models.transformer import generate
from pipelines.judge import writes_function
from pipelines.train.loop import token_loss_sum

log = logging.getLogger(__name__)

Prompt = tuple[list[Message], str, bool]  # (prompt messages, reference answer, is a code-writing task)


def answer_loss_sum(model: Any, batch: dict[str, Any]) -> tuple[float, int]:
    """(sum of token cross-entropies over labels != IGNORE, number of such tokens) for one batch of rows."""
    t = {k: torch.as_tensor(v) for k, v in batch.items()}
    logits = model(t["input_ids"], position_ids=t.get("position_ids"), doc_ids=t.get("doc_ids"))  # (B, T, V)
    loss, n = token_loss_sum(logits, t["labels"])
    return float(loss), int(n)


def heldout_answer_loss(model: Any, rows: dict[str, np.ndarray], batch_size: int = 8) -> float:
    """Mean cross-entropy per answer token over all rows (token-weighted, so packing does not change it)."""
    model.eval()
    total, n = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(rows["input_ids"]), batch_size):
            s, k = answer_loss_sum(model, {key: v[i : i + batch_size] for key, v in rows.items()})
            total, n = total + s, n + k
    return total / max(n, 1)


def generate_answers(
    model: Any, tok: Any, fmt: ChatFormat, prompts: Sequence[Sequence[Message]], max_new_tokens: int
) -> list[str]:
    """Greedy answers (KV-cached ``models.transformer.generate``) to each prompt conversation, stopping at
    <|im_end|>; a prompt longer than the context leaves keeps its last tokens."""
    stops = (tok.im_end_id, tok.eot_id)
    keep = max(1, model.cfg.max_seq_len - max_new_tokens)
    out = []
    for msgs in prompts:
        ids = encode_prompt(tok, fmt, msgs)[-keep:]
        gen = generate(model, ids, max_new_tokens, temperature=0.0, stop_ids=stops)
        out.append(tok.decode([i for i in gen if i not in stops]))
    return out


def parse_rate(answers: Sequence[str], prompts: Sequence[Prompt]) -> float | None:
    """Share of the answers to code-writing prompts that parse and define a function; None without such prompts."""
    code = [writes_function(a) for a, (_, _, is_code) in zip(answers, prompts) if is_code]
    return sum(code) / len(code) if code else None


@dataclass
class EvalReport:
    answer_loss: float
    parse_rate: float | None  # share of answers to code-writing prompts that parse and define a function (None: none)
    samples: list[dict]  # [{"prompt", "reference", "generated"}]


def evaluate(
    model: Any,
    tok: Any,
    fmt: ChatFormat,
    val_rows: dict[str, np.ndarray],
    prompts: Sequence[Prompt],
    max_new_tokens: int,
) -> EvalReport:
    """Held-out answer loss plus greedy answers to ``prompts``."""
    loss = heldout_answer_loss(model, val_rows)
    gens = generate_answers(model, tok, fmt, [p for p, _, _ in prompts], max_new_tokens)
    samples = [{"prompt": p[-1]["content"], "reference": ref, "generated": g} for (p, ref, _), g in zip(prompts, gens)]
    return EvalReport(loss, parse_rate(gens, prompts), samples)


def eval_prompts(convs: Sequence[tuple[list[Message], dict]], n: int, seed: int) -> list[Prompt]:
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


class StepEval:
    """The loop's eval hook: greedy answers to a few held-out prompts at each eval step -> parse rate (all ranks run
    it, so FSDP's collectives match; rank 0's numbers are kept). ``init_from`` may be a URI (fetched once per node)."""

    def __init__(self, init_from: str, prompts: list[Prompt], max_new_tokens: int) -> None:
        self.init_from, self.prompts, self.max_new_tokens = init_from, prompts, max_new_tokens

    def __call__(self, model: Any, step: int) -> dict:
        from models.checkpoint import load_tokenizer
        from models.parallel import unwrap
        from pipelines.artifacts import checkpoint_dir

        ckpt = checkpoint_dir(self.init_from)
        tok, fmt = load_tokenizer(ckpt), ChatFormat.from_checkpoint(ckpt)
        gens = generate_answers(unwrap(model), tok, fmt, [p for p, _, _ in self.prompts], self.max_new_tokens)
        if gens:
            log.info("step %d sample: %r -> %r", step, self.prompts[0][0][-1]["content"][:80], gens[0][:120])
        rate = parse_rate(gens, self.prompts)
        return {} if rate is None else {"parse_rate": rate}

"""Preference data: reading the three JSONL forms, counting and quarantining bad lines, rendering pairs into rows.

Accepted lines (one JSON object each):

* ``{"prompt": str, "chosen": str, "rejected": str[, "margin": float, "source": str]}``: the prompt is a user turn,
  the answers assistant turns (what ``genloop pref-data`` writes);
* messages-style ``{"chosen": [messages], "rejected": [messages]}``: two whole conversations that share everything
  but their final assistant turn;
* what ``genloop feedback export`` writes: ``{"prompt", "chosen", "rejected", "messages", "source"}``, where
  ``messages`` (the conversation the model answered) is used when present; when it is null the prompt was a plain
  completion and its text is used as is (raw text, no chat template).

A line that is not JSON, not an object, lacks a field, has a non-string answer, equal answers, or prompts that differ
between the two conversations is counted by reason and written to the quarantine list; it is never fatal unless no
pair remains (then one error naming the file and the expected fields). Exact duplicates (same prompt, chosen,
rejected) are dropped and counted.

Rendering (``pair_rows``): each side is the checkpoint's chat template applied to prompt + answer (``encode_chat``),
``<side>_ids`` right-padded with the pad token to ``seq_len``, ``<side>_labels`` = next token on answer tokens.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from models.chat import ChatError, ChatFormat, Message, encode_chat
from pipelines.artifacts import NOT_JSON, exists, is_dir, join, jsonl_lines, write_text
from pipelines.lifecycle import StageRun
from pipelines.train.objective import IGNORE

log = logging.getLogger(__name__)

EXPECTED = (
    '{"prompt", "chosen", "rejected"[, "margin", "source"]} or {"chosen": [messages], "rejected": '
    "[messages]} (one JSON object per line)"
)
TRAIN_FILE, VAL_FILE, QUARANTINE_FILE = "train.jsonl", "val.jsonl", "quarantine.jsonl"


@dataclass
class PrefPair:
    """One preference: ``prompt`` is the conversation before the answer (messages) or raw prompt text."""

    prompt: list[Message] | str
    chosen: str
    rejected: str
    margin: float = 0.0
    source: str = ""
    chosen_score: float | None = None  # the judge's scores, when a judge made the pair
    rejected_score: float | None = None

    def key(self) -> tuple[str, str, str]:
        return (json.dumps(self.prompt, sort_keys=True), self.chosen, self.rejected)

    def prompt_key(self) -> str:
        return json.dumps(self.prompt, sort_keys=True)

    def to_json(self) -> dict[str, Any]:
        """The plain form (prompt as user text when the conversation is one user turn, else messages)."""
        p = self.prompt
        if isinstance(p, list) and len(p) == 1 and p[0]["role"] == "user":
            p = p[0]["content"]
        out: dict[str, Any] = {"prompt": p, "chosen": self.chosen, "rejected": self.rejected}
        if self.margin:
            out["margin"] = self.margin
        if self.source:
            out["source"] = self.source
        if self.chosen_score is not None:
            out["chosen_score"], out["rejected_score"] = self.chosen_score, self.rejected_score
        return out


def _messages(x: Any) -> list[Message] | None:
    if not isinstance(x, list) or not x:
        return None
    for m in x:
        if not (
            isinstance(m, dict)
            and m.get("role") in ("system", "user", "assistant")
            and isinstance(m.get("content"), str)
        ):
            return None
    return [{"role": m["role"], "content": m["content"]} for m in x]


def parse_pair(obj: Any, default_source: str = "") -> tuple[PrefPair | None, str]:
    """(pair, "") for a valid record, else (None, reason)."""
    if not isinstance(obj, dict):
        return None, "not_an_object"
    if "chosen" not in obj or "rejected" not in obj:
        return None, "missing_fields"
    chosen, rejected = obj["chosen"], obj["rejected"]
    margin = obj.get("margin", 0.0)
    if margin is None:
        margin = 0.0
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or margin != margin:
        return None, "bad_margin"
    source = obj.get("source") if isinstance(obj.get("source"), str) else default_source
    if isinstance(chosen, list) or isinstance(rejected, list):  # messages-style
        c, r = _messages(chosen), _messages(rejected)
        if c is None or r is None:
            return None, "bad_messages"
        if c[-1]["role"] != "assistant" or r[-1]["role"] != "assistant":
            return None, "no_final_assistant_turn"
        if c[:-1] != r[:-1]:
            return None, "prompts_differ"
        prompt: list[Message] | str = c[:-1]
        chosen, rejected = c[-1]["content"], r[-1]["content"]
        if not prompt:
            return None, "missing_fields"
    else:
        if not isinstance(chosen, str) or not isinstance(rejected, str):
            return None, "answer_not_a_string"
        msgs = _messages(obj.get("messages")) if obj.get("messages") is not None else None
        if obj.get("messages") is not None and msgs is None:
            return None, "bad_messages"
        if msgs is not None:
            prompt = msgs[:-1] if msgs[-1]["role"] == "assistant" else msgs
        elif not isinstance(obj.get("prompt"), str) or not obj["prompt"].strip():
            return None, "missing_fields"
        elif "messages" in obj:  # feedback export of a plain completion: the raw prompt text
            prompt = obj["prompt"]
        else:
            prompt = [{"role": "user", "content": obj["prompt"]}]
    if not chosen.strip() or not rejected.strip():
        return None, "empty_answer"
    if chosen == rejected:
        return None, "same_answers"
    return PrefPair(prompt, chosen, rejected, float(margin), source), ""


def read_pairs(path: str, counts: Counter, quarantine: list[dict], default_source: str = "") -> list[PrefPair]:
    """Every valid, distinct pair of a JSONL file; bad lines counted (``bad_<reason>``) and listed in ``quarantine``."""
    if not exists(path):
        raise FileNotFoundError(f"preference file {path} does not exist; pass a JSONL file of {EXPECTED}")
    pairs: list[PrefPair] = []
    seen: set[tuple[str, str, str]] = set()
    for i, line, obj in jsonl_lines(path):
        counts["lines"] += 1
        pair, reason = (None, "not_json") if obj is NOT_JSON else parse_pair(obj, default_source)
        if reason:
            counts[f"bad_{reason}"] += 1
            quarantine.append({"file": path, "line": i, "reason": reason, "text": line[:500]})
            continue
        if pair.key() in seen:
            counts["duplicates"] += 1
            continue
        seen.add(pair.key())
        pairs.append(pair)
    return pairs


def require_pairs(pairs: Sequence[PrefPair], path: str, counts: Counter) -> None:
    if not pairs:
        raise ValueError(f"{path}: no usable preference pair ({dict(counts)}); expected {EXPECTED}")


def data_files(data: str) -> tuple[str, str | None]:
    """(train file, held-out file or None) for ``--data``: a JSONL file, or a folder with train.jsonl [+ val.jsonl]
    (what ``genloop pref-data`` writes)."""
    if is_dir(data):
        train = join(data, TRAIN_FILE)
        if not exists(train):
            raise FileNotFoundError(
                f"--data {data} is a folder without {TRAIN_FILE}; pass a preference JSONL file "
                "or a folder `genloop pref-data` wrote"
            )
        val = join(data, VAL_FILE)
        return train, (val if exists(val) else None)
    return data, None


def split_pairs(pairs: Sequence[PrefPair], val_fraction: float, seed: int) -> tuple[list[PrefPair], list[PrefPair]]:
    """(train, held-out) by a hash of the prompt: every pair of one prompt lands on the same side."""
    threshold = int(val_fraction * 10_000)
    train, val = [], []
    for p in pairs:
        h = int.from_bytes(hashlib.sha256(f"{seed}:{p.prompt_key()}".encode()).digest()[:8], "big")
        (val if h % 10_000 < threshold else train).append(p)
    return train, val


def write_pairs(path: str, pairs: Sequence[PrefPair]) -> None:
    write_text(path, "".join(json.dumps(p.to_json(), ensure_ascii=False) + "\n" for p in pairs))


def write_quarantine(out: str, quarantine: list[dict]) -> str | None:
    if not quarantine:
        return None
    path = join(out, QUARANTINE_FILE)
    write_text(path, "".join(json.dumps(q, ensure_ascii=False) + "\n" for q in quarantine))
    return path


def load_pairs(
    data: str, val_data: str, val_fraction: float, seed: int, counts: Counter, quarantine: list[dict]
) -> tuple[list, list]:
    """(train pairs, held-out pairs) from ``--data`` (+ ``val_data``), bad lines counted and quarantined."""
    train_file, val_file = data_files(data)
    val_file = val_data or val_file
    pairs = read_pairs(train_file, counts, quarantine)
    require_pairs(pairs, train_file, counts)
    if val_file:
        vc: Counter = Counter()
        val = read_pairs(val_file, vc, quarantine)
        counts.update({f"val_{k}": v for k, v in vc.items()})
        if val:
            return pairs, val
        log.warning(
            "%s holds no usable pair: holding out %.0f%% of %s's prompts instead",
            val_file,
            100 * val_fraction,
            train_file,
        )
    return split_pairs(pairs, val_fraction, seed)


# ---- rendering -----------------------------------------------------------------------------------------------------
def encode_answer(tok: Any, fmt: ChatFormat, prompt: list[Message] | str, answer: str) -> tuple[list[int], list[int]]:
    """(ids, mask) of prompt + answer: the chat template for a conversation, raw text for a plain completion
    (mask 1 on the answer tokens and, in chat form, the closing end token)."""
    if isinstance(prompt, str):
        head = tok.encode(prompt, allow_special=True)
        body = tok.encode(answer)
        return head + body, [0] * len(head) + [1] * len(body)
    return encode_chat(tok, fmt, [*prompt, {"role": "assistant", "content": answer}])


def side_row(ids: list[int], mask: list[int], seq_len: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids (T,), labels (T,)): right-padded ids; ``labels[t] = ids[t+1]`` where ``mask[t+1]``, else -100."""
    n = len(ids)
    row = np.full(seq_len, pad_id, dtype=np.int64)
    row[:n] = ids
    labels = np.full(seq_len, IGNORE, dtype=np.int64)
    nxt = np.asarray(ids[1:], dtype=np.int64)
    keep = np.asarray(mask[1:], dtype=bool)
    labels[: n - 1] = np.where(keep, nxt, IGNORE)
    return row, labels


def pair_rows(
    pairs: Sequence[PrefPair], tok: Any, fmt: ChatFormat, seq_len: int, counts: Counter, prefix: str = ""
) -> dict[str, np.ndarray]:
    """Rows for the pair objectives (``pipelines/prefs/objectives.py``); a pair with a side longer than ``seq_len``
    tokens, or that the template cannot render, is dropped and counted (``<prefix>dropped_too_long`` /
    ``..._unrenderable``)."""
    cols: dict[str, list] = {
        k: [] for k in ("chosen_ids", "chosen_labels", "rejected_ids", "rejected_labels", "margin")
    }
    for p in pairs:
        try:
            sides = [encode_answer(tok, fmt, p.prompt, a) for a in (p.chosen, p.rejected)]
        except ChatError:
            counts[f"{prefix}dropped_unrenderable"] += 1
            continue
        if max(len(ids) for ids, _ in sides) > seq_len:
            counts[f"{prefix}dropped_too_long"] += 1
            continue
        if any(sum(m) == 0 for _, m in sides):
            counts[f"{prefix}dropped_no_answer_tokens"] += 1
            continue
        for name, (ids, mask) in zip(("chosen", "rejected"), sides):
            row, labels = side_row(ids, mask, seq_len, tok.pad_id)
            cols[f"{name}_ids"].append(row)
            cols[f"{name}_labels"].append(labels)
        cols["margin"].append(p.margin)
    counts[f"{prefix}pairs_rendered"] += len(cols["margin"])
    if not cols["margin"]:
        return {}
    out = {k: np.stack(v) for k, v in cols.items() if k != "margin"}
    out["margin"] = np.asarray(cols["margin"], dtype=np.float32)
    return out


def to_dataset(rows: dict[str, np.ndarray]) -> Any:
    """A Ray Dataset of the rows (one item per pair)."""
    import ray.data

    n = len(next(iter(rows.values())))
    return ray.data.from_items([{k: v[i] for k, v in rows.items()} for i in range(n)])


@dataclass
class PairStage:
    """What the reward and DPO stages share before training: the config with absolute paths and a resolved
    checkpoint, its local copy, tokenizer and chat format, the pair rows (train / held-out), the counts, the loop
    config, and the begun stage run (``pipelines/lifecycle.py``)."""

    cfg: Any
    init_local: str  # the checkpoint folder on this node (an s3:// checkpoint is read through the local cache)
    tok: Any
    fmt: ChatFormat
    seq_len: int
    rows: dict[str, np.ndarray]
    val_rows: dict[str, np.ndarray]
    counts: Counter
    loop: Any  # TrainLoopConfig (in_process: one process, strategy none)
    artifact: StageRun


def begin_pair_stage(stage: str, cfg: Any) -> PairStage:
    """Validate ``cfg`` (a reward / dpo config: init_from, data, val_data, val_fraction, out, seq_len, seed, train,
    in_process, overwrite), begin the stage run (``pipelines/lifecycle.py``), and read the pairs into rows; bad lines
    are counted and quarantined, too few pairs for one global batch is a clear error."""
    import dataclasses

    from models.checkpoint import load_config, load_tokenizer
    from pipelines.artifacts import local_copy, resolve_checkpoint
    from pipelines.lifecycle import absolute_paths, begin_stage

    for key in ("init_from", "data", "out"):
        if not getattr(cfg, key):
            raise ValueError(f"{stage} needs --{key.replace('_', '-')} (see genloop {stage} --help)")
    cfg = absolute_paths(cfg, "init_from", "data", "val_data", "out")
    cfg = dataclasses.replace(cfg, init_from=resolve_checkpoint(cfg.init_from))
    cfg.train.validate()
    init_local = local_copy(cfg.init_from)
    mcfg = load_config(init_local)
    seq_len = cfg.seq_len or mcfg.max_seq_len
    if seq_len > mcfg.max_seq_len:
        raise ValueError(f"{stage}.seq_len={seq_len} exceeds the checkpoint's max_seq_len={mcfg.max_seq_len}")
    artifact = begin_stage(
        stage,
        cfg.out,
        cfg,
        inputs={"--init-from": cfg.init_from, "--data": cfg.data, "--val-data": cfg.val_data},
        overwrite=cfg.overwrite,
    )
    tok = load_tokenizer(init_local)
    fmt = ChatFormat.from_checkpoint(init_local)

    counts: Counter = Counter()
    quarantine: list[dict] = []
    train_pairs, val_pairs = load_pairs(cfg.data, cfg.val_data, cfg.val_fraction, cfg.seed, counts, quarantine)
    rows = pair_rows(train_pairs, tok, fmt, seq_len, counts)
    val_rows = pair_rows(val_pairs, tok, fmt, seq_len, counts, prefix="val_")
    write_quarantine(cfg.out, quarantine)
    counts.update(
        train_pairs=len(rows.get("margin", ())), val_pairs=len(val_rows.get("margin", ())), quarantined=len(quarantine)
    )
    loop = cfg.train
    if cfg.in_process:
        loop = dataclasses.replace(loop, strategy="none", num_workers=1)
    if counts["train_pairs"] < loop.global_rows():
        raise ValueError(
            f"{cfg.data}: {counts['train_pairs']} usable training pairs ({dict(counts)}), fewer than "
            f"one global batch ({loop.global_rows()}); add pairs or lower train.micro_batch_size"
        )
    log.info(
        "%s data: %d train pairs, %d held-out, %s",
        stage,
        counts["train_pairs"],
        counts["val_pairs"],
        {k: v for k, v in counts.items() if k.startswith(("bad_", "dropped_", "val_bad", "val_dropped"))},
    )
    return PairStage(cfg, init_local, tok, fmt, seq_len, rows, val_rows, counts, loop, artifact)

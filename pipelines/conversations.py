"""Conversations from JSONL: ``{"messages": [...]}`` or ``{"prompt": ..., "response": ...}`` rows (``"answer"`` in
place of ``"response"``: a `genloop tasks` row) -> chat messages
plus the row's ``meta``. Shared by the stages that read instruction data (SFT trains on them, RLHF and eval take their
prompts from them). Bad lines are counted by kind and skipped, never raised.

Two readings: ``read_conversations`` (SFT's, strict: a row needs an assistant turn to learn from) and
``read_prompt_rows`` (RLHF, eval, pref-data: a row is a prompt, ``{"prompt": str}`` or ``{"messages": [...]}`` with
a final assistant turn optional, plus any other fields, kept as the row's columns for reward functions; TRL's
dataset-columns convention)."""

from __future__ import annotations

import logging
import random
from collections import Counter
from typing import Any

from models.chat import ROLES, Message
from pipelines.artifacts import NOT_JSON, exists, jsonl_lines

log = logging.getLogger(__name__)


def parse_record(obj: Any) -> tuple[list[Message] | None, str]:
    """(messages, "") for a valid record, else (None, reason) with reason one of the counted drop kinds."""
    if not isinstance(obj, dict):
        return None, "not_an_object"
    if "messages" in obj:
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not msgs:
            return None, "missing_fields"
    elif "prompt" in obj and ("response" in obj or "answer" in obj):
        # {"prompt", "answer"}: a `genloop tasks` row, its reference answer the response (SFT before RL on a task)
        response = obj["response"] if "response" in obj else obj["answer"]
        msgs = ([{"role": "system", "content": obj["system"]}] if obj.get("system") else []) + [
            {"role": "user", "content": obj["prompt"]},
            {"role": "assistant", "content": response},
        ]
    else:
        return None, "missing_fields"
    out, reason = _messages(msgs)
    if out is None:
        return None, reason
    if not any(m["role"] == "assistant" and m["content"] for m in out):
        return None, "no_assistant_turn"
    return out, ""


PROMPT_KEYS = ("prompt", "messages", "system")  # what makes the prompt; every other field of a row is a column


def _messages(msgs: Any) -> tuple[list[Message] | None, str]:
    out: list[Message] = []
    for m in msgs:
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            return None, "missing_fields"
        if m["role"] not in ROLES:
            return None, "unknown_role"
        if not isinstance(m["content"], str):
            return None, "bad_content"
        out.append({"role": m["role"], "content": m["content"]})
    return out, ""


def parse_prompt_record(obj: Any) -> tuple[list[Message] | None, str, dict[str, Any], str]:
    """(prompt messages, reference answer, columns, "") of a prompt row, else (None, "", {}, reason).

    A row is ``{"prompt": str}`` (optional ``"system"``; a ``"response"`` is the reference answer) or ``{"messages":
    [...]}`` whose final assistant turn, if any, is the reference answer and not part of the prompt. The prompt must
    end in a user turn. ``columns``: every field but ``prompt``/``messages``/``system``, as is."""
    if not isinstance(obj, dict):
        return None, "", {}, "not_an_object"
    if "messages" in obj:
        if not isinstance(obj["messages"], list) or not obj["messages"]:
            return None, "", {}, "missing_fields"
        msgs, reason = _messages(obj["messages"])
        if msgs is None:
            return None, "", {}, reason
    elif "prompt" in obj:
        if not isinstance(obj["prompt"], str) or not obj["prompt"].strip():
            return None, "", {}, "bad_content"
        system = obj.get("system")
        if system is not None and not isinstance(system, str):
            return None, "", {}, "bad_content"
        msgs = [{"role": "system", "content": system}] if system else []
        msgs.append({"role": "user", "content": obj["prompt"]})
    else:
        return None, "", {}, "missing_fields"
    reference = obj.get("response") if isinstance(obj.get("response"), str) else ""
    if msgs[-1]["role"] == "assistant":
        reference, msgs = msgs[-1]["content"], msgs[:-1]
    if not msgs or msgs[-1]["role"] != "user":
        return None, "", {}, "no_user_turn"
    return msgs, reference, {k: v for k, v in obj.items() if k not in PROMPT_KEYS}, ""


def read_prompt_rows(path: str, counts: Counter) -> list[tuple[list[Message], str, dict[str, Any]]]:
    """[(prompt messages, reference answer, columns)] from a JSONL file (local or URI), one per good row; bad lines
    counted in ``counts["bad_<reason>"]``, never raised."""
    if not exists(path):
        raise FileNotFoundError(
            f'prompts file {path} does not exist; pass JSONL rows of {{"prompt": ...}} or '
            '{"messages": [...]} (sft-data or `genloop tasks` output)'
        )
    rows = []
    for n, _, obj in jsonl_lines(path):
        counts["lines"] += 1
        if obj is NOT_JSON:
            counts["bad_json"] += 1
            continue
        msgs, reference, columns, reason = parse_prompt_record(obj)
        if msgs is None:
            counts[f"bad_{reason}"] += 1
            if counts[f"bad_{reason}"] <= 3:
                log.warning("%s:%d skipped (%s)", path, n, reason)
            continue
        rows.append((msgs, reference, columns))
    return rows


def read_conversations(path: str, counts: Counter) -> list[tuple[list[Message], dict]]:
    """[(messages, meta)] from a JSONL file (local or URI); bad lines counted in ``counts["bad_<reason>"]``, never
    raised."""
    if not exists(path):
        raise FileNotFoundError(f"SFT data {path} does not exist; make one with `genloop sft-data --out {path}`")
    rows = []
    for n, _, obj in jsonl_lines(path):
        counts["lines"] += 1
        if obj is NOT_JSON:
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


def split_conversations(convs: list, fraction: float, seed: int) -> tuple[list, list]:
    """(train, held-out): a seeded shuffle, then ``fraction`` (at least one when > 0) held out."""
    items = list(convs)
    random.Random(seed).shuffle(items)
    n_val = max(1, int(len(items) * fraction)) if fraction > 0 and len(items) > 1 else 0
    return items[n_val:], items[:n_val]

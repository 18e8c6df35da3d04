"""Generated tasks with reference answers, for RL with verifiable rewards (``genloop tasks``).

``arithmetic``: problems such as ``"Compute 47+38. Reply with the number only."`` with ``answer`` ``"85"``, as
``{"prompt", "answer", "a", "op", "b"}`` rows (what ``--prompts`` of rlhf / eval / pref-data reads; the reward
functions ``fn:exact_answer`` and ``fn:number_answer`` read ``answer``). A train split and a held-out split that
share no problem: problems are unique by (a, op, b), with ``a op b`` and ``b op a`` one problem for ``+`` and ``*``
(the same sum is not new), drawn without replacement and the first ``heldout`` of the draw held out. Deterministic
by seed.
"""

from __future__ import annotations

import json
import logging
import math
import random
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

OPS = ("+", "-", "*")
COMMUTATIVE = ("+", "*")
TRAIN_FILE, HELDOUT_FILE = "train.jsonl", "heldout.jsonl"
TEMPLATE = "Compute {a}{op}{b}. Reply with the number only."


@dataclass
class ArithmeticConfig:
    out: str = ""
    n: int = 2000  # train problems
    heldout: int = 256  # held-out problems (never in train)
    digits: int = 2  # operands have exactly this many digits (1: 0..9)
    ops: str = "+"  # comma-separated, of + - *
    seed: int = 0
    overwrite: bool = False


def parse_ops(ops: str) -> list[str]:
    out = [o.strip() for o in ops.split(",") if o.strip()]
    bad = [o for o in out if o not in OPS]
    if not out or bad:
        raise ValueError(f"--ops {ops!r}: use a comma-separated list of {', '.join(OPS)} (e.g. --ops +,-)")
    return sorted(set(out), key=out.index)


def operand_range(digits: int) -> tuple[int, int]:
    """Inclusive bounds of a ``digits``-digit operand (1 digit: 0..9)."""
    if digits < 1 or digits > 9:
        raise ValueError(f"--digits {digits}: use 1..9")
    return (0 if digits == 1 else 10 ** (digits - 1)), 10**digits - 1


def problem_key(a: int, op: str, b: int) -> tuple[int, str, int]:
    """The identity of a problem: (a, op, b), operands sorted for commutative ops."""
    return (min(a, b), op, max(a, b)) if op in COMMUTATIVE else (a, op, b)


def space_size(digits: int, ops: list[str]) -> int:
    """How many distinct problems exist."""
    lo, hi = operand_range(digits)
    k = hi - lo + 1
    return sum(k * (k + 1) // 2 if op in COMMUTATIVE else k * k for op in ops)


def solve(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


def problem_row(a: int, op: str, b: int) -> dict[str, Any]:
    return {"prompt": TEMPLATE.format(a=a, op=op, b=b), "answer": str(solve(a, op, b)), "a": a, "op": op, "b": b}


def arithmetic_problems(
    n: int, heldout: int, digits: int = 2, ops: str = "+", seed: int = 0
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train rows, held-out rows): ``n`` + ``heldout`` distinct problems drawn with ``random.Random(seed)``."""
    if n < 1 or heldout < 0:
        raise ValueError(f"--n {n} must be >= 1 and --heldout {heldout} >= 0")
    op_list = parse_ops(ops)
    lo, hi = operand_range(digits)
    total = n + heldout
    space = space_size(digits, op_list)
    if total > space:
        raise ValueError(
            f"{n} + {heldout} problems asked but only {space} distinct {digits}-digit problems exist "
            f"with ops {','.join(op_list)}; lower --n / --heldout or raise --digits"
        )
    rng = random.Random(seed)
    seen: set[tuple[int, str, int]] = set()
    rows: list[dict[str, Any]] = []
    if total * 2 > space:  # dense: enumerate every problem and sample (rejection would crawl)
        keys = sorted({problem_key(a, op, b) for op in op_list for a in range(lo, hi + 1) for b in range(lo, hi + 1)})
        for a, op, b in rng.sample(keys, total):
            if op in COMMUTATIVE and rng.random() < 0.5:
                a, b = b, a
            rows.append(problem_row(a, op, b))
    else:
        while len(rows) < total:
            a, op, b = rng.randint(lo, hi), rng.choice(op_list), rng.randint(lo, hi)
            key = problem_key(a, op, b)
            if key in seen:
                continue
            seen.add(key)
            rows.append(problem_row(a, op, b))
    return rows[heldout:], rows[:heldout]


def jsonl_text(rows: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def run_arithmetic(cfg: ArithmeticConfig) -> dict[str, Any]:
    """Write ``train.jsonl``, ``heldout.jsonl`` and ``manifest.json`` (stage ``tasks``) to ``cfg.out``."""
    from pipelines.artifacts import Manifest, absolute, join, write_text

    if not cfg.out:
        raise ValueError("no --out: pass the folder to write train.jsonl and heldout.jsonl to")
    out = absolute(cfg.out)
    train, held = arithmetic_problems(cfg.n, cfg.heldout, cfg.digits, cfg.ops, cfg.seed)
    manifest = Manifest.begin("tasks", out, cfg, overwrite=cfg.overwrite)
    write_text(join(out, TRAIN_FILE), jsonl_text(train))
    write_text(join(out, HELDOUT_FILE), jsonl_text(held))
    answers = [int(r["answer"]) for r in train + held]
    counts = {"train": len(train), "heldout": len(held), "space": space_size(cfg.digits, parse_ops(cfg.ops))}
    metrics = {
        "answer_min": min(answers),
        "answer_max": max(answers),
        "answer_digits_mean": sum(len(str(abs(x))) for x in answers) / len(answers),
        "log10_space": math.log10(counts["space"]),
    }
    manifest.finish(counts=counts, metrics=metrics)
    log.info(
        "tasks arithmetic: %d train + %d held-out problems (%s, %d digits, seed %d) -> %s",
        len(train),
        len(held),
        cfg.ops,
        cfg.digits,
        cfg.seed,
        out,
    )
    return {"out": out, "train": join(out, TRAIN_FILE), "heldout": join(out, HELDOUT_FILE), **counts}

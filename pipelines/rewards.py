"""Reward functions (RLHF, eval, pref-data): built-ins by name, a user's own file, a reward model; weighted and combined.

The ``--reward`` spec is a comma-separated list of parts, each with an optional weight (default 1)::

    fn:code_judge                  a built-in (``BUILTINS``)
    fn:code_judge:0.5              ... weighted
    fn:path/to/file.py:func[:W]    a user's function (as OpenRLHF takes a reward-function file)
    RM_DIR | rm:RM_DIR[:W]         a reward model folder (``genloop reward``'s output or its model/)

A function is ``func(prompts: list[str], responses: list[str], **columns) -> list[float]``: one score per pair (a
prompt is repeated for each of its sampled answers). ``columns`` are the other fields of the ``--prompts`` rows
(``{"prompt": ..., "answer": "85"}`` gives ``answer=[...]``), each a list aligned with ``responses`` (TRL's
convention): a function gets every column when it takes ``**kwargs``, else only the ones it names, and none when it
takes only ``(prompts, responses)``. A column a function names without a default is required: rows that lack it are
refused before any rollout (``RewardSet.check_columns``). A function that raises, returns the wrong number of scores
or a non-finite score stops the run with a ``RewardError`` naming the function and the problem.

Verifiable built-ins (0/1, from a reference ``answer`` column; verl's strict and flexible gsm8k extractors in
spirit, report both so format gains are not sold as answer gains): ``exact_answer`` (the stripped response is the
answer) and ``number_answer`` (the last number in the response equals the answer numerically); ``concise_answer``
shapes toward the strict one (right number, scaled by how much of the response is the answer).
"""

from __future__ import annotations

import importlib.util
import inspect
import logging
import math
import os
import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

log = logging.getLogger(__name__)

RewardFn = Callable[..., list[float]]  # (prompts, responses, **columns) -> one score per answer


class RewardError(ValueError):
    """A bad reward spec or a reward function that misbehaved; the message says which and what to do."""


def _code_judge(prompts: list[str], responses: list[str]) -> list[float]:
    from pipelines.judge import code_judge

    return code_judge(prompts, responses)


def _signature_match(prompts: list[str], responses: list[str]) -> list[float]:
    from pipelines.judge import signature_match

    return signature_match(prompts, responses)


def _judge_pass(prompts: list[str], responses: list[str]) -> list[float]:
    from pipelines.judge import code_judge

    return [1.0 if s == 1.0 else 0.0 for s in code_judge(prompts, responses)]


def _writes_function(prompts: list[str], responses: list[str]) -> list[float]:
    from pipelines.judge import writes_function

    return [1.0 if writes_function(r) else 0.0 for r in responses]


# a number as people write it: optional minus (not a binary minus after a digit), thousands commas, decimals; a
# trailing period ("85.") is the sentence's, not the number's; "1,2,3" is a list (last: 3)
_NUMBER_IN_TEXT = re.compile(r"(?<![\d.])-?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|(?<![\d.])-?\.\d+")


def last_number(text: str) -> float | None:
    """The last number written in ``text`` (``"-1,234.5"`` -> -1234.5), or None."""
    found = [m.group(0) for m in _NUMBER_IN_TEXT.finditer(text)]
    if not found:
        return None
    return float(found[-1].replace(",", ""))


def _as_number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        text = value.strip().replace(",", "")
        try:
            return float(text)
        except ValueError:
            return None
    return None


def exact_answer(prompts: list[str], responses: list[str], answer: list[Any]) -> list[float]:
    """1.0 where the stripped response equals the stripped ``answer`` (numbers compared as written: ``str(85)``)."""
    return [1.0 if r.strip() == str(a).strip() else 0.0 for r, a in zip(responses, answer)]


def number_answer(prompts: list[str], responses: list[str], answer: list[Any]) -> list[float]:
    """1.0 where the last number in the response equals ``answer`` numerically (commas in thousands, decimals and
    a minus sign read; ``"The sum is 1,085."`` matches ``1085``), else 0.0 (no number, or an answer that is not
    one)."""
    out = []
    for r, a in zip(responses, answer):
        got, want = last_number(r), _as_number(a)
        out.append(
            1.0 if got is not None and want is not None and math.isclose(got, want, rel_tol=1e-9, abs_tol=1e-9) else 0.0
        )
    return out


def concise_answer(prompts: list[str], responses: list[str], answer: list[Any]) -> list[float]:
    """Dense shaping toward the bare answer, for a model that never writes it: where the last number is right
    (``number_answer``), the share of the response's non-space characters that are the answer's
    (``"85"`` 1.0, ``"= 85"`` 2/3, ``"47 + 38 = 85"`` 2/8); 0.0 where it is wrong. Among right answers the shorter
    scores higher, so GRPO's group-relative advantage pushes toward the bare number ``exact_answer`` checks (a format
    no sampled answer may have at the start, where ``exact_answer`` alone gives no signal). Spaces do not count:
    counted, GRPO learned to drop them ("63+51=114.") rather than the equation."""
    right = number_answer(prompts, responses, answer)
    out = []
    for ok, r, a in zip(right, responses, answer):
        want, got = "".join(str(a).split()), "".join(r.split())
        out.append(ok * min(1.0, len(want) / max(1, len(got))))
    return out


BUILTINS: dict[str, RewardFn] = {
    "exact_answer": exact_answer,  # 1 when the stripped response is the `answer` column (strict)
    "number_answer": number_answer,  # 1 when the response's last number equals the `answer` column (flexible)
    "concise_answer": concise_answer,  # right number x the answer's share of the response (no spaces), 0..1
    "code_judge": _code_judge,  # pipelines/judge.py: the requested function with the requested signature, 0..1
    "writes_function": _writes_function,  # 1 when the answer parses and defines a function
    "judge_pass": _judge_pass,  # 1 only when the judge passes the answer (the requested signature, a real body)
    "signature_match": _signature_match,  # dense shaping: how close the first def line is to the requested one, 0..1
}


def register_reward(name: str) -> Callable[[RewardFn], RewardFn]:
    def deco(fn: RewardFn) -> RewardFn:
        BUILTINS[name] = fn
        return fn

    return deco


@dataclass(frozen=True)
class RewardPart:
    """One term of the combined reward."""

    name: str  # as logged: reward/<name>
    kind: str  # "fn" (a function) | "rm" (a reward model)
    target: str  # built-in name, "file.py:func", or the reward model folder
    weight: float = 1.0


_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _split_weight(text: str) -> tuple[str, float]:
    """``"name:0.5"`` -> ("name", 0.5); no numeric tail -> weight 1 (a function named ``nan`` stays a name)."""
    head, sep, tail = text.rpartition(":")
    if sep and _NUMBER.fullmatch(tail):
        return head, float(tail)
    return text, 1.0


def parse_reward_spec(spec: str) -> list[RewardPart]:
    """``"RM_DIR,fn:code_judge:0.5,fn:my.py:f"`` -> parts (see the module docstring)."""
    parts: list[RewardPart] = []
    for raw in (s.strip() for s in spec.split(",")):
        if not raw:
            continue
        if raw.startswith("fn:"):
            body, weight = _split_weight(raw[3:])
            if ".py:" in body:
                path, _, func = body.rpartition(":")
                name = f"{os.path.splitext(os.path.basename(path))[0]}.{func}"
                parts.append(RewardPart(name, "fn", f"{path}:{func}", weight))
            else:
                if body not in BUILTINS:
                    raise RewardError(
                        f"unknown reward function {body!r} in --reward; built-ins: "
                        f"{', '.join(sorted(BUILTINS))}, or fn:path/to/file.py:func for your own"
                    )
                parts.append(RewardPart(body, "fn", body, weight))
        else:
            body = raw[3:] if raw.startswith("rm:") else raw
            path, weight = _split_weight(body) if raw.startswith("rm:") else (body, 1.0)
            parts.append(RewardPart("rm", "rm", path, weight))
    if not parts:
        raise RewardError("--reward is empty: pass a reward model folder and/or fn:NAME (e.g. fn:code_judge)")
    names = [p.name for p in parts]
    if len(set(names)) != len(names):
        raise RewardError(f"--reward names a part twice ({', '.join(names)}); give each once with its weight")
    return parts


def load_function(part: RewardPart) -> RewardFn:
    """The callable behind a ``fn`` part: a built-in, or ``func`` imported from a user's Python file."""
    if part.target in BUILTINS:
        return BUILTINS[part.target]
    path, _, func = part.target.rpartition(":")
    if not os.path.isfile(path):
        raise RewardError(
            f"reward function file {path} does not exist (from fn:{part.target}); pass an existing "
            "Python file: fn:path/to/file.py:func"
        )
    spec = importlib.util.spec_from_file_location(f"genloop_reward_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    try:
        spec.loader.exec_module(module)  # type: ignore[union-attr]
    except Exception as e:  # a user's file: any error is theirs to see
        raise RewardError(f"reward function file {path} failed to import: {type(e).__name__}: {e}") from e
    fn = getattr(module, func, None)
    if not callable(fn):
        raise RewardError(f"{path} has no function {func!r}; define def {func}(prompts, responses) -> list[float]")
    return fn


@dataclass(frozen=True)
class ColumnUse:
    """Which ``--prompts`` columns a reward function takes (from its signature)."""

    all: bool  # it takes **kwargs: every column
    named: frozenset[str]  # keyword parameters after (prompts, responses)
    required: frozenset[str]  # ... of them without a default


def column_use(fn: Callable[..., Any]) -> ColumnUse:
    """Read ``fn``'s signature: the first two positional parameters are (prompts, responses); any other named
    parameter is a column, required when it has no default; ``**kwargs`` takes every column."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):  # a builtin without a signature: (prompts, responses) only
        return ColumnUse(False, frozenset(), frozenset())
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    takes_all = any(p.kind == p.VAR_KEYWORD for p in params)
    rest = [p for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p not in positional[:2]]
    return ColumnUse(
        takes_all, frozenset(p.name for p in rest), frozenset(p.name for p in rest if p.default is p.empty)
    )


def call_reward(
    name: str,
    fn: Callable[..., Any],
    prompts: list[str],
    responses: list[str],
    columns: Mapping[str, Sequence[Any]] | None = None,
) -> list[float]:
    """``fn(prompts, responses, **columns it takes)`` checked: one finite float per pair, else a ``RewardError``
    naming ``name``."""
    kwargs: dict[str, list[Any]] = {}
    if columns:
        use = column_use(fn)
        for k, v in columns.items():
            if use.all or k in use.named:
                if len(v) != len(responses):
                    raise RewardError(
                        f"column {k!r} has {len(v)} values for {len(responses)} answers (internal: "
                        "columns must be aligned with the responses)"
                    )
                kwargs[k] = list(v)
    try:
        out = fn(list(prompts), list(responses), **kwargs)
    except Exception as e:
        raise RewardError(
            f"reward function {name} raised {type(e).__name__}: {e} (on a batch of {len(prompts)} "
            "answers); fix the function or drop it from --reward"
        ) from e
    try:
        scores = [float(x) for x in out]
    except (TypeError, ValueError) as e:
        raise RewardError(
            f"reward function {name} must return a list of numbers, got {type(out).__name__} ({e})"
        ) from None
    if len(scores) != len(prompts):
        raise RewardError(
            f"reward function {name} returned {len(scores)} scores for {len(prompts)} answers; it must "
            "return one score per (prompt, response) pair"
        )
    bad = [i for i, s in enumerate(scores) if not math.isfinite(s)]
    if bad:
        raise RewardError(
            f"reward function {name} returned a non-finite score ({scores[bad[0]]}) for answer "
            f"{bad[0]}; return finite floats"
        )
    return scores


class RewardSet:
    """The combined reward: sum of weight x part over the parts of a spec.

    ``rm_score`` (given by the caller when a reward-model part exists) maps (prompts, responses, prompt_ids,
    response_ids) to scores; it runs in the reward model's own actor(s).
    """

    def __init__(self, parts: Sequence[RewardPart]) -> None:
        self.parts = list(parts)
        self.fns = {p.name: load_function(p) for p in self.parts if p.kind == "fn"}

    @classmethod
    def from_spec(cls, spec: str) -> "RewardSet":
        return cls(parse_reward_spec(spec))

    @property
    def reward_model(self) -> RewardPart | None:
        return next((p for p in self.parts if p.kind == "rm"), None)

    def required_columns(self) -> dict[str, frozenset[str]]:
        """{part name: the columns its function needs} for the parts that need any."""
        need = {name: column_use(fn).required for name, fn in self.fns.items()}
        return {k: v for k, v in need.items() if v}

    def check_columns(self, columns: Mapping[str, Sequence[Any]], n_rows: int, source: str = "--prompts") -> None:
        """Refuse, before any rollout, prompt rows that lack a column a reward function needs (a missing field is
        ``None`` in ``columns``): one ``RewardError`` naming the function, the column and how many rows lack it."""
        problems = []
        for name, need in self.required_columns().items():
            for col in sorted(need):
                values = columns.get(col)
                missing = n_rows if values is None else sum(v is None for v in values)
                if missing:
                    problems.append(f"fn:{name} needs the column {col!r}, which {missing} of {n_rows} rows lack")
        if problems:
            have = ", ".join(sorted(k for k, v in columns.items() if any(x is not None for x in v))) or "none"
            raise RewardError(
                f"{source}: {'; '.join(problems)} (the rows' columns: {have}); give every row the "
                f'field, e.g. {{"prompt": "Compute 47+38.", "answer": "85"}} (`genloop tasks '
                "arithmetic` writes such rows), or drop the function from --reward"
            )

    def score(
        self,
        prompts: list[str],
        responses: list[str],
        rm_score: Callable[[], list[float]] | None = None,
        columns: Mapping[str, Sequence[Any]] | None = None,
    ) -> tuple[list[float], dict[str, list[float]]]:
        """(total per answer, {part name: its unweighted scores}). ``columns``: the prompt rows' other fields, each
        a list aligned with ``responses``."""
        parts: dict[str, list[float]] = {}
        for p in self.parts:
            if p.kind == "fn":
                parts[p.name] = call_reward(p.name, self.fns[p.name], prompts, responses, columns)
            else:
                if rm_score is None:
                    raise RewardError("the reward spec has a reward model but no reward-model scorer was started")
                parts[p.name] = call_reward("reward model", lambda _p, _r: rm_score(), prompts, responses)
        total = [sum(p.weight * parts[p.name][i] for p in self.parts) for i in range(len(prompts))]
        return total, parts


class RewardModelWorker:
    """A reward model (``models/scalar_model.py``, what ``genloop reward`` writes) scoring answers by token ids: the
    score at the last token of prompt + answer. Plain class; ``stage.py`` runs it as Ray actor(s)."""

    def __init__(self, path: str, pad_id: int, micro_batch_size: int = 16, threads: int = 1) -> None:
        import torch

        from models.scalar_model import load_scalar_model

        if not torch.cuda.is_available():
            torch.set_num_threads(threads)
        self.device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        self.model = load_scalar_model(path)[0].to(self.device).eval()
        self.pad_id = pad_id
        self.micro = micro_batch_size

    def score(self, prompt_ids: list[list[int]], response_ids: list[list[int]]) -> list[float]:
        import torch

        from models.scalar_model import sequence_scores

        out: list[float] = []
        seqs = [list(p) + list(r) for p, r in zip(prompt_ids, response_ids)]
        with torch.no_grad():
            for lo in range(0, len(seqs), self.micro):
                chunk = seqs[lo : lo + self.micro]
                ids = torch.full((len(chunk), max(len(s) for s in chunk)), self.pad_id, dtype=torch.long)
                for i, s in enumerate(chunk):
                    ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
                ids = ids.to(self.device)
                out += sequence_scores(self.model(ids), ids, self.pad_id).float().cpu().tolist()
        return out


def function_rewards(spec: str | None) -> "RewardSet | None":
    """The ``RewardSet`` of a ``--reward`` spec made of ``fn:`` parts only (``genloop eval``, ``pref-data``), or None
    for no spec."""
    if not spec:
        return None
    rs = RewardSet.from_spec(spec)
    if rs.reward_model is not None:
        raise RewardError(
            f"--reward {spec!r} has an rm: part; here --reward takes fn: parts only (genloop eval scores "
            "with a reward model through --reward-model)"
        )
    return rs

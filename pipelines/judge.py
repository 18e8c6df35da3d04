"""The programmatic code judge: how well a response answers a code-writing prompt, as a score in [0, 1].

Prompts are the ``write`` prompts of ``genloop sft-data`` (``pipelines/sft/data.py``: ``WRITE_PROMPTS``), which name
the wanted function in backticks: ``Implement `def clamp(x, lo=0, hi=1) -> int` in Python. ...``. The judge parses
the requested name and parameter names from the first backticked signature, then grades the response's code (the
first ``` fence, else the whole text):

=====  =========================================================================================================
score  the response ...
=====  =========================================================================================================
0.0    has no code that parses with ``ast.parse`` (or is empty)
0.25   parses but defines no function (a comment, an import, an expression)
0.5    defines a function, but none with the requested name
0.75   defines the requested name, but with other parameter names or a trivial body
1.0    defines the requested name with the requested parameter names (in order) and a non-trivial body
=====  =========================================================================================================

A trivial body is one with nothing but a docstring, ``pass``, ``...``, ``return`` / ``return None`` or
``raise NotImplementedError``. A prompt that requests no signature (no backticked ``def name(...)`` or
``name(...)``) accepts any function name and parameters, so its scores are 0 / 0.25 / 0.5 (trivial body) / 1.0.

Two forms: ``judge(prompt, response) -> float`` and the reward-function form used by RLHF and ``pref-data``,
``code_judge(prompts, responses) -> list[float]``. Pure Python (``ast``), no torch, no Ray.

``signature_match`` is a dense companion for RL (``fn:signature_match``): how close the first ``def`` line of the
answer is to the requested signature, character by character (``difflib``), whether or not the rest parses. The
judge's steps give a policy that copies only part of a name the same score as one that copies none of it; this
shaping term tells GRPO's groups apart there. It is a reward, not a measure: evaluation reports the judge.
"""

from __future__ import annotations

import ast
import difflib
import re
from dataclasses import dataclass

# the first ``` fence (```python / ```py / bare); an unclosed fence runs to the end of the text
_FENCE = re.compile(r"```(?:python|py)?\s*\n(.*?)(?:```|$)", re.S)
_BACKTICKED = re.compile(r"`([^`\n]+)`")

NO_PARSE, PARSES, DEFINES_FUNCTION, RIGHT_NAME, RIGHT_SIGNATURE = 0.0, 0.25, 0.5, 0.75, 1.0


def extract_code(text: str) -> str:
    """The code of an answer: the inside of its first ``` fence, else the whole text."""
    m = _FENCE.search(text)
    return m.group(1) if m else text


def parse_code(text: str) -> ast.Module | None:
    """The answer's code (``extract_code``) parsed with ``ast.parse``; None if empty or not Python."""
    code = extract_code(text)
    if not code.strip():
        return None
    try:
        return ast.parse(code)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None


def parses_as_python(text: str) -> bool:
    """Does the answer (or the code inside its first ``` fence) parse with ``ast.parse``? Empty text does not."""
    return parse_code(text) is not None


def writes_function(text: str) -> bool:
    """The parse-rate test for code-writing prompts: the answer (or its first ``` fence) parses with ``ast.parse``
    AND defines a function. Parsing alone is too weak: a pretrained model's comment lines or bare imports parse too."""
    tree = parse_code(text)
    return tree is not None and any(isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) for n in ast.walk(tree))


@dataclass(frozen=True)
class Signature:
    """What a prompt asks for: a function name and its parameter names in order (``*args``/``**kw`` by name)."""

    name: str
    params: tuple[str, ...]


def _params(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> tuple[str, ...]:
    a = fn.args
    names = [x.arg for x in (*a.posonlyargs, *a.args)]
    if a.vararg:
        names.append("*" + a.vararg.arg)
    names += [x.arg for x in a.kwonlyargs]
    if a.kwarg:
        names.append("**" + a.kwarg.arg)
    return tuple(names)


def _as_signature(text: str) -> Signature | None:
    """``def f(a, b=1) -> int`` / ``async def f(...)`` / ``f(a, b)`` as a Signature; None if it is not one."""
    text = text.strip().rstrip(":")
    if not re.match(r"(async\s+)?def\s", text):
        if not re.match(r"[A-Za-z_]\w*\s*\(", text):
            return None
        text = "def " + text
    try:
        tree = ast.parse(text + ":\n    pass")
    except (SyntaxError, ValueError, RecursionError):
        return None
    fn = tree.body[0] if len(tree.body) == 1 else None
    if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
        return None
    return Signature(fn.name, _params(fn))


def requested_signature(prompt: str) -> Signature | None:
    """The function a code-writing prompt asks for: its first backticked text that reads as a signature."""
    for m in _BACKTICKED.finditer(prompt):
        sig = _as_signature(m.group(1))
        if sig is not None:
            return sig
    return None


def is_trivial(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    """True when the body does nothing: only a docstring / ``pass`` / ``...`` / ``return [None]`` /
    ``raise NotImplementedError``."""
    for stmt in fn.body:
        if isinstance(stmt, ast.Pass):
            continue
        if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant):  # docstring, ``...``, a bare literal
            continue
        if isinstance(stmt, ast.Return) and (
            stmt.value is None or (isinstance(stmt.value, ast.Constant) and stmt.value.value is None)
        ):
            continue
        if isinstance(stmt, ast.Raise) and stmt.exc is not None:
            exc = stmt.exc.func if isinstance(stmt.exc, ast.Call) else stmt.exc
            if isinstance(exc, ast.Name) and exc.id == "NotImplementedError":
                continue
        return False
    return True


def judge_code(sig: Signature | None, response: str) -> float:
    """The score of ``response`` against a requested signature (None: any function); see the module table."""
    tree = parse_code(response)
    if tree is None:
        return NO_PARSE
    fns = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    if not fns:
        return PARSES
    best = DEFINES_FUNCTION
    for fn in fns:
        if sig is not None and fn.name != sig.name:
            continue
        right_params = sig is None or _params(fn) == sig.params
        if right_params and not is_trivial(fn):
            return RIGHT_SIGNATURE
        if sig is not None:
            best = RIGHT_NAME
    return best


_DEF_LINE = re.compile(r"^\s*(?:async\s+)?def\s+([A-Za-z_]\w*)\s*\(([^)\n]*)\)?", re.M)


def _param_names(text: str) -> tuple[str, ...]:
    """``"a, b=1, *args, c: int"`` -> ("a", "b", "*args", "c"): names only, as ``_params`` gives them."""
    names = []
    for part in text.split(","):
        m = re.match(r"\s*(\*{0,2}\s*[A-Za-z_]\w*)", part)
        if m:
            names.append(m.group(1).replace(" ", ""))
    return tuple(names)


def signature_similarity(sig: Signature | None, response: str) -> float:
    """In [0, 1]: 1 when the answer's first ``def`` line names the requested function with the requested parameters;
    otherwise the ``difflib`` ratio of ``name(p1, p2)`` written vs requested. 0 without a ``def`` line. A prompt that
    requests no signature: 1 for any ``def`` line."""
    m = _DEF_LINE.search(extract_code(response))
    if m is None:
        return 0.0
    if sig is None:
        return 1.0
    written = f"{m.group(1)}({', '.join(_param_names(m.group(2)))})"
    wanted = f"{sig.name}({', '.join(sig.params)})"
    return difflib.SequenceMatcher(None, written, wanted, autojunk=False).ratio()


def signature_match(prompts: list[str], responses: list[str]) -> list[float]:
    """The reward-function form of ``signature_similarity`` (``fn:signature_match`` in RLHF)."""
    if len(prompts) != len(responses):
        raise ValueError(
            f"signature_match got {len(prompts)} prompts but {len(responses)} responses; pass one "
            "response per prompt (repeat a prompt for each of its samples)"
        )
    return [signature_similarity(requested_signature(p), r) for p, r in zip(prompts, responses)]


def judge(prompt: str, response: str) -> float:
    """Score in [0, 1] of ``response`` as an answer to the code-writing ``prompt`` (see the module table)."""
    return judge_code(requested_signature(prompt), response)


def code_judge(prompts: list[str], responses: list[str]) -> list[float]:
    """The reward-function form (``fn:code_judge`` in RLHF): one score per (prompt, response) pair."""
    if len(prompts) != len(responses):
        raise ValueError(
            f"code_judge got {len(prompts)} prompts but {len(responses)} responses; pass one response "
            "per prompt (repeat a prompt for each of its samples)"
        )
    return [judge(p, r) for p, r in zip(prompts, responses)]

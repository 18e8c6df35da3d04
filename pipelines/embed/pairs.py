"""Pairs a code corpus gives for free: a function's or class's docstring -> its code without the docstring.

Module docstrings are left out on purpose: ``genloop rag-eval``'s shipped questions are made from them. A file goes
wholly to training or to the held-out set (by a hash of its path), so no held-out function's neighbours were seen.
"""

from __future__ import annotations

import ast
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

log = logging.getLogger(__name__)


@dataclass
class Pair:
    query: str  # the docstring
    doc: str  # the definition's source without its docstring
    path: str  # the file it came from
    name: str


def pairs_from_source(source: str, path: str, min_doc_words: int = 4, max_code_chars: int = 2000) -> list[Pair]:
    """One pair per documented function/method/class (docstring of at least ``min_doc_words`` words); the code is
    cut to ``max_code_chars`` (a retriever indexes chunks of that order)."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    lines = source.splitlines()
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            continue
        doc = ast.get_docstring(node)
        if not doc or len(doc.split()) < min_doc_words or not node.body:
            continue
        body0 = node.body[0]
        code = lines[node.lineno - 1 : node.end_lineno]
        # drop the docstring's lines (the first statement of the body)
        start, end = body0.lineno - node.lineno, body0.end_lineno - node.lineno + 1
        code = code[:start] + code[end:]
        text = "\n".join(code).strip()
        if len(text) < 40:
            continue
        out.append(Pair(" ".join(doc.split()), text[:max_code_chars], path, node.name))
    return out


def held_out(path: str, share: float) -> bool:
    return int(hashlib.sha256(path.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF < share


def corpus_pairs(files: Iterable[tuple[Path, str]], held_out_share: float = 0.1) -> tuple[list[Pair], list[Pair]]:
    """(train pairs, held-out pairs) from ``(file, id)`` items; a file's pairs all go one way."""
    train, test = [], []
    for p, name in files:
        try:
            src = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        ps = pairs_from_source(src, name)
        (test if held_out(name, held_out_share) else train).extend(ps)
    return train, test

"""``genloop rag-eval``: how well the knowledge store finds the document a question is about, lexical (BM25) alone,
dense alone and hybrid (RRF), side by side on one question set.

Questions: JSONL, one ``{"question": str, "doc": expected document id, "answer": optional str}`` per line. A
question's ranking is the store's chunk ranking with repeats of a document dropped (a document ranks where its best
chunk does), ``depth`` chunks deep. Metrics (BEIR's, per question then averaged): ``recall@k`` = 1 if the expected
document is among the first k documents (one relevant document per question, so this is also hit rate / success
at k), ``mrr`` = 1 / rank of the expected document (0 if not within ``depth`` chunks).

The shipped question set (``configs/rag/stdlib_questions.jsonl``, rebuilt by ``genloop rag-eval --write-questions
FILE``) comes from the corpus by fixed rules, not tuned to any retriever: every documented module of this Python's
standard library (``stdlib_corpus``: its ``.py`` files without tests, site-packages and private modules) gives the
first sentence of its docstring, with the module's own name removed (a question must not name its answer), lead-ins
such as "This module provides" dropped, a fixed table of generic English synonyms applied (``SYNONYMS``: file ->
file stays, directory -> folder, create -> make, ...) and one of two question templates picked by a hash of the
path. Sentences shorter than 3 words after that, and sentences two modules share (generated codecs), are left out.
A second set, ``configs/rag/howto_questions.jsonl``, holds 29 how-to questions in plain words written by hand
before any retrieval ran (one more, about ``itertools``, was dropped: it is a C module, not in the store). The store
for both: ``genloop rag-eval --build-stdlib --store DIR`` (every file of ``stdlib_corpus``, ids
``stdlib/<path>``).

Answer accuracy with RAG on vs off (``--model``) plugs in as one more column computed from the same questions (their
``answer`` strings); ``evaluate`` takes the ranking functions to compare, so a model-backed one adds a row.
"""

from __future__ import annotations

import ast
import hashlib
import json
import logging
import os
import re
import sysconfig
from pathlib import Path
from typing import Callable

from serve.knowledge import Doc, KnowledgeStore

log = logging.getLogger(__name__)

SKIP_DIRS = ("site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test")
PREFIX = "stdlib"

# lead-ins that say nothing about the subject (matched at the start, case-insensitive, longest first)
LEAD_INS = sorted(
    [
        "this module provides",
        "this module implements",
        "this module contains",
        "this module defines",
        "this module",
        "the module",
        "a module for",
        "a module to",
        "module for",
        "module to",
        "module that",
        "module which",
        "provides",
        "implements",
        "contains",
        "defines",
        "support for",
        "utilities for",
        "utility functions for",
        "functions for",
        "functions to",
        "routines for",
        "tools for",
        "classes for",
        "implementation of",
        "an implementation of",
        "interface to",
        "helpers for",
        "code for",
        "stuff to",
        "a simple",
        "simple",
        "basic",
        "some",
        "various",
        "a",
        "an",
        "the",
    ],
    key=len,
    reverse=True,
)

# generic English synonyms, written once for this rule set (no word in it was picked by looking at retrieval)
SYNONYMS = {
    "create": "make",
    "creates": "makes",
    "creating": "making",
    "generate": "produce",
    "generating": "producing",
    "retrieve": "fetch",
    "retrieving": "fetching",
    "directory": "folder",
    "directories": "folders",
    "function": "routine",
    "functions": "routines",
    "utilities": "helpers",
    "utility": "helper",
    "manipulate": "change",
    "manipulating": "changing",
    "manipulation": "changing",
    "convert": "turn",
    "converting": "turning",
    "conversion": "turning",
    "construct": "build",
    "constructing": "building",
    "obtain": "get",
    "determine": "find out",
    "execute": "run",
    "executing": "running",
    "execution": "running",
    "terminate": "stop",
    "display": "show",
    "displaying": "showing",
    "compute": "calculate",
    "computing": "calculating",
    "arbitrary": "any",
    "numerous": "many",
    "implementation": "code",
    "interface": "API",
    "module": "library",
    "modules": "libraries",
    "object": "value",
    "objects": "values",
    "parse": "read",
    "parsing": "reading",
    "parser": "reader",
    "represent": "stand for",
    "representing": "standing for",
    "handle": "deal with",
    "handling": "dealing with",
    "support": "help",
    "supports": "helps",
    "useful": "handy",
    "large": "big",
    "small": "little",
    "fast": "quick",
    "quickly": "fast",
    "extension": "add-on",
    "extensions": "add-ons",
    "specified": "given",
    "specify": "give",
}
TEMPLATES = ("Which part of the standard library deals with {}?", "Where do I find code for {}?")


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_corpus(root: Path | None = None) -> list[tuple[Path, str]]:
    """(file, document id ``stdlib/<path>``) of the standard library's ``.py`` files, tests and site-packages
    left out; sorted."""
    root = root or stdlib_root()
    out = []
    for d, dirs, files in os.walk(root):
        dirs[:] = sorted(x for x in dirs if x not in SKIP_DIRS)
        for f in sorted(files):
            if f.endswith(".py"):
                p = Path(d) / f
                out.append((p, f"{PREFIX}/{p.relative_to(root).as_posix()}"))
    return sorted(out, key=lambda x: x[1])


def build_store(store: KnowledgeStore, files: list[tuple[Path, str]], batch: int = 64) -> dict:
    """Write every readable file as a document (title: its file name); one transaction per ``batch`` files."""
    counts = {"added": 0, "replaced": 0, "chunks": 0, "skipped": 0}
    docs: list[Doc] = []

    def flush() -> None:
        r = store.apply(docs)
        for k in ("added", "replaced", "chunks"):
            counts[k] += r[k]
        docs.clear()

    for p, doc_id in files:
        try:
            text = p.read_text(encoding="utf-8")
            docs.append(store.check(doc_id, text, p.name))
        except (OSError, UnicodeDecodeError, ValueError) as e:
            counts["skipped"] += 1
            log.info("skipped %s: %s", p, e)
        if len(docs) >= batch:
            flush()
    if docs:
        flush()
    return counts


def first_sentence(doc: str) -> str:
    s = re.split(r"(?<=[.!?])\s|\n\s*\n", doc.strip(), maxsplit=1)[0]
    return " ".join(s.split())


def question_from(doc_id: str, docstring: str) -> str | None:
    """The rule-made question of one module (None: too little left to ask about)."""
    rel = doc_id.split("/", 1)[1]
    parts = rel[:-3].split("/")
    names = {parts[-1] if parts[-1] != "__init__" else parts[-2] if len(parts) > 1 else ""} - {""}
    names |= {".".join(p for p in parts if p != "__init__"), parts[0]}
    s = first_sentence(docstring)
    if "generated" in s.lower():
        return None
    s = re.sub(r"^[\w.]+\s*(--|-|:)\s+", "", s)  # "codecs -- Python Codec Registry" -> "Python Codec Registry"
    s = re.sub(r"^the [\w.]+ module\s*(--|-|:)\s+", "", s, flags=re.I)
    for n in sorted(names, key=len, reverse=True):  # the module's own name: a question must not name its answer
        s = re.sub(rf"(?<![\w.]){re.escape(n)}(?![\w])", " ", s, flags=re.I)
    s = re.sub(r"\b(python|module)\b", " ", s, flags=re.I) if len(s.split()) > 3 else s
    s = " ".join(s.split()).strip(" .:;,-'\"")
    changed = True
    while changed:
        changed = False
        for lead in LEAD_INS:
            if s.lower().startswith(lead + " "):
                s, changed = s[len(lead) + 1 :], True
                break
    words = [SYNONYMS.get(w.lower(), w) if w.islower() or w.istitle() else w for w in s.split()]
    s = " ".join(words).strip(" .:;,-")
    if len(re.findall(r"\w+", s)) < 3:
        return None
    s = s[0].lower() + s[1:] if s[:1].isupper() and not s[:2].isupper() else s
    pick = int(hashlib.sha256(doc_id.encode()).hexdigest(), 16) % len(TEMPLATES)
    return TEMPLATES[pick].format(s)


def stdlib_questions(root: Path | None = None) -> list[dict]:
    """``{"question", "doc"}`` for every public documented module of ``stdlib_corpus`` (rules: module docstring)."""
    out: list[dict] = []
    first: dict[str, list[str]] = {}
    for p, doc_id in stdlib_corpus(root):
        rel = doc_id.split("/", 1)[1]
        if any(part.startswith("_") and part != "__init__.py" for part in rel.split("/")):
            continue  # private modules (and __main__): not what a question would be about
        try:
            doc = ast.get_docstring(ast.parse(p.read_text(encoding="utf-8")))
        except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
            continue
        if not doc:
            continue
        q = question_from(doc_id, doc)
        if q:
            first.setdefault(first_sentence(doc).lower(), []).append(doc_id)
            out.append({"question": q, "doc": doc_id, "_first": first_sentence(doc).lower()})
    # a sentence two modules share cannot tell them apart
    kept = [dict(question=r["question"], doc=r["doc"]) for r in out if len(first[r["_first"]]) == 1]
    qs = {}
    for r in kept:
        qs.setdefault(r["question"], []).append(r)
    return [r for r in kept if len(qs[r["question"]]) == 1]


def load_questions(path: str | Path) -> list[dict]:
    out = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not JSON ({e})") from None
        if not isinstance(r, dict) or not isinstance(r.get("question"), str) or not isinstance(r.get("doc"), str):
            raise ValueError(f'{path}:{n}: need {{"question": str, "doc": str}}, got {line[:80]!r}')
        out.append(r)
    if not out:
        raise ValueError(f"{path} holds no questions")
    return out


def doc_ranking(store: KnowledgeStore, question: str, mode: str, depth: int) -> list[str]:
    """Document ids best first: the store's ``depth`` best chunks with repeats of a document dropped."""
    seen: list[str] = []
    for p in store.search(question, depth, mode=mode):
        if p.doc_id not in seen:
            seen.append(p.doc_id)
    return seen


def metrics(rankings: list[list[str]], expected: list[str], ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """``recall@k`` for each k and ``mrr``, averaged over the questions (one expected document each)."""
    n = len(expected)
    out: dict[str, float] = {}
    for k in ks:
        out[f"recall@{k}"] = sum(e in r[:k] for r, e in zip(rankings, expected)) / n if n else 0.0
    out["mrr"] = sum(1.0 / (r.index(e) + 1) if e in r else 0.0 for r, e in zip(rankings, expected)) / n if n else 0.0
    return out


def evaluate(
    questions: list[dict], rankers: dict[str, Callable[[str], list[str]]], ks: tuple[int, ...] = (1, 5)
) -> dict[str, dict]:
    """``{ranker name: metrics + {"n", "misses"}}``; ``rankers`` map a question to document ids best first."""
    expected = [q["doc"] for q in questions]
    out = {}
    for name, rank in rankers.items():
        rankings = [rank(q["question"]) for q in questions]
        m = metrics(rankings, expected, ks)
        m["n"] = len(questions)
        m["misses"] = [q["question"] for q, r in zip(questions, rankings) if q["doc"] not in r[: max(ks)]]
        out[name] = m
    return out

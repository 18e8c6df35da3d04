"""``genloop sft-data``: an instruction set built from a Python code corpus with ``ast`` (no download).

For every function with a docstring, two conversations:

- ``write``: the user asks for a function with the given signature that does what the docstring's first paragraph
  says; the assistant answers with the function's code (``ast.unparse``, docstring removed) — an answer that parses.
- ``explain``: the user shows the function's code; the assistant answers with the docstring's first paragraph.

Duplicates (the same normalised code up to the function's name, or the same instruction) are dropped and counted.
The held-out split is by a hash of the function's normalised code, so both tasks of one function (and its copies)
land on the same side.

Output: ``--out FILE.jsonl`` (train), ``FILE.val.jsonl`` (held-out), ``FILE.stats.json`` (counts + config); or
``--out DIR``: an artifact folder with ``train.jsonl``, ``val.jsonl`` and ``manifest.json``. Each line is
``{"messages": [...], "meta": {"task", "source", "key"}}``, the format ``genloop sft --data FILE_OR_DIR`` reads.
"""

from __future__ import annotations

import ast
import hashlib
import json
import logging
import re
import sysconfig
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

from pipelines.artifacts import exists, is_uri, join, list_files, read_text, write_text
from pipelines.lifecycle import begin_stage

log = logging.getLogger(__name__)

WRITE_PROMPTS = (
    "Write a Python function `{sig}` that does the following: {doc}",
    "Implement `{sig}` in Python. {doc}",
    "{doc}\nWrite this as a Python function with the signature `{sig}`.",
)
EXPLAIN_PROMPTS = (
    "What does this Python function do?\n\n```python\n{code}\n```",
    "Explain the purpose of the following code in one or two sentences.\n\n```python\n{code}\n```",
)


@dataclass
class SftDataConfig:
    from_code: list[str] = field(default_factory=list)  # files or folders; empty = this Python's stdlib
    out: str = ""
    val_fraction: float = 0.05
    tasks: list[str] = field(default_factory=lambda: ["write", "explain"])
    min_doc_chars: int = 20
    max_doc_chars: int = 400
    max_code_lines: int = 30  # longer functions are skipped (counted as too_long)
    min_code_lines: int = 2
    exclude: list[str] = field(default_factory=lambda: ["/test/", "/tests/", "idle_test", "site-packages", "/lib2to3/"])
    include_private: bool = False  # functions named _x (dunder methods always skipped)
    max_examples: int = 0  # 0 = no cap; otherwise stop after this many train+val examples
    seed: int = 0
    overwrite: bool = False


def corpus_files(paths: list[str], exclude: list[str]) -> Iterator[str]:
    """Every ``*.py`` under ``paths`` (files, folders, ``s3://`` / ``gs://`` URIs; sorted, deterministic), minus paths
    containing an ``exclude`` substring."""
    for root in paths or [sysconfig.get_paths()["stdlib"]]:
        if is_uri(root):
            files = [f for f in list_files(root) if f.endswith(".py") or f == root]
            if not files:
                raise FileNotFoundError(f"--from-code {root} holds no Python files; pass Python files or folders")
        else:
            r = Path(root)
            if not r.exists():
                raise FileNotFoundError(f"--from-code {root} does not exist; pass Python files or folders holding them")
            files = [str(r)] if r.is_file() else [str(f) for f in sorted(r.rglob("*.py"))]
        for f in files:
            if not any(x in f.replace("\\", "/") for x in exclude):
                yield f


def first_paragraph(doc: str) -> str:
    """A docstring's summary: its first paragraph, whitespace collapsed."""
    para = re.split(r"\n\s*\n", doc.strip(), maxsplit=1)[0]
    return " ".join(para.split())


def strip_docstring(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> ast.AST | None:
    """A copy of ``fn`` without its docstring; None when nothing but the docstring is left."""
    body = fn.body[1:] if ast.get_docstring(fn, clean=False) is not None else fn.body
    if not body:
        return None
    new = type(fn)(**{f: getattr(fn, f) for f in fn._fields})
    new.body = body
    return ast.fix_missing_locations(new)


def signature(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> str:
    prefix = "async def" if isinstance(fn, ast.AsyncFunctionDef) else "def"
    ret = f" -> {ast.unparse(fn.returns)}" if fn.returns is not None else ""
    return f"{prefix} {fn.name}({ast.unparse(fn.args)}){ret}"


def _hash(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


def examples_from_source(source: str, origin: str, cfg: SftDataConfig, counts: Counter) -> Iterator[dict]:
    """Conversations (with ``meta.key``, the function's normalised-code hash) from one module's source."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        counts["files_unparsable"] += 1
        return
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        counts["functions"] += 1
        doc = ast.get_docstring(node)
        if node.name.startswith("__") or (node.name.startswith("_") and not cfg.include_private):
            counts["skipped_private"] += 1
            continue
        if not doc:
            counts["skipped_no_docstring"] += 1
            continue
        summary = first_paragraph(doc)
        if not (cfg.min_doc_chars <= len(summary) <= cfg.max_doc_chars):
            counts["skipped_doc_length"] += 1
            continue
        stripped = strip_docstring(node)
        if stripped is None:
            counts["skipped_empty_body"] += 1
            continue
        try:
            code = ast.unparse(stripped)
        except (ValueError, RecursionError):
            counts["skipped_unparse_error"] += 1
            continue
        n_lines = code.count("\n") + 1
        if n_lines > cfg.max_code_lines:
            counts["skipped_too_long"] += 1
            continue
        if n_lines < cfg.min_code_lines:
            counts["skipped_too_short"] += 1
            continue
        # dedup/split key: the code with the function's name blanked, so renamed copies (aliases) count as one
        key = f"{_hash(code.replace(f'def {node.name}(', 'def _(', 1)):016x}"
        where = f"{origin}:{node.lineno}"
        h = _hash(key + str(cfg.seed))
        for task in cfg.tasks:
            if task == "write":
                prompt = WRITE_PROMPTS[h % len(WRITE_PROMPTS)].format(sig=signature(node), doc=summary)
                answer = code
            elif task == "explain":
                prompt = EXPLAIN_PROMPTS[h % len(EXPLAIN_PROMPTS)].format(code=code)
                answer = summary
            else:
                raise ValueError(f"unknown sft-data task {task!r}; tasks are 'write' and 'explain'")
            yield {
                "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}],
                "meta": {"task": task, "source": where, "key": key},
            }


def build(cfg: SftDataConfig) -> tuple[list[dict], list[dict], Counter]:
    """(train, held-out, counts). Exact dedup on (task, normalised code) and (task, instruction)."""
    counts: Counter = Counter()
    seen: set[tuple[str, str]] = set()
    train: list[dict] = []
    val: list[dict] = []
    threshold = int(cfg.val_fraction * 10_000)
    for path in corpus_files(cfg.from_code, cfg.exclude):
        counts["files"] += 1
        try:
            source = read_text(path)
        except (OSError, UnicodeDecodeError):
            counts["files_unreadable"] += 1
            continue
        for ex in examples_from_source(source, path, cfg, counts):
            task, key = ex["meta"]["task"], ex["meta"]["key"]
            prompt = ex["messages"][0]["content"]
            if (task, key) in seen or (task, prompt) in seen:
                counts["duplicates"] += 1
                continue
            seen.update({(task, key), (task, prompt)})
            side = val if _hash(key + "split" + str(cfg.seed)) % 10_000 < threshold else train
            side.append(ex)
            counts[f"task_{task}"] += 1
            if cfg.max_examples and len(train) + len(val) >= cfg.max_examples:
                break
        if cfg.max_examples and len(train) + len(val) >= cfg.max_examples:
            counts["stopped_at_max_examples"] = 1
            break
    counts["train"], counts["val"] = len(train), len(val)
    return train, val, counts


TRAIN_FILE, VAL_FILE = "train.jsonl", "val.jsonl"


def val_path(out: str) -> str:
    """Where the held-out split lives: ``data.jsonl`` -> ``data.val.jsonl``; an artifact folder -> ``DIR/val.jsonl``
    (local paths or URIs)."""
    if not out.endswith(".jsonl"):
        return join(out, VAL_FILE)
    return out[: -len(".jsonl")] + ".val.jsonl"


def train_path(out: str) -> str:
    """The train file: ``data.jsonl`` itself, or ``DIR/train.jsonl`` for an artifact folder."""
    return out if out.endswith(".jsonl") else join(out, TRAIN_FILE)


def stats_path(out: str) -> str:
    return out[: -len(".jsonl")] + ".stats.json"


def write_jsonl(rows: list[dict], path: str) -> None:
    write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def run(cfg: SftDataConfig) -> dict:
    """Build the set and write it. ``out`` ending in ``.jsonl``: that file, ``.val.jsonl`` and ``.stats.json`` next to
    it; otherwise an artifact folder with ``train.jsonl``, ``val.jsonl`` and ``manifest.json`` (local or URI). Returns
    the stats."""
    if not cfg.out:
        raise ValueError("sft-data needs --out FILE.jsonl or --out DIR (where to write the instruction set)")
    if not 0.0 <= cfg.val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {cfg.val_fraction}")
    artifact = None
    if cfg.out.endswith(".jsonl"):  # plain files beside each other, no artifact folder
        if exists(cfg.out) and not cfg.overwrite:
            raise ValueError(f"{cfg.out} already exists; pass --overwrite (overwrite=true) or choose another --out")
    else:  # no checkpoints to resume from: an unfinished folder is cleared and rebuilt
        sources = cfg.from_code or [sysconfig.get_paths()["stdlib"]]
        artifact = begin_stage(
            "sft-data", cfg.out, cfg, inputs={"--from-code": sources}, overwrite=cfg.overwrite, resume=False
        )
    train, val, counts = build(cfg)
    if not train:
        raise ValueError(
            f"no instruction examples found in {cfg.from_code or 'the stdlib'} "
            f"({dict(counts)}); pass folders with documented Python functions"
        )
    write_jsonl(train, train_path(cfg.out))
    write_jsonl(val, val_path(cfg.out))
    stats = {
        "stage": "sft-data",
        "out": train_path(cfg.out),
        "val": val_path(cfg.out),
        "counts": dict(sorted(counts.items())),
        "config": asdict(cfg),
    }
    if artifact is not None:
        artifact.finish(counts=stats["counts"])
    else:
        write_text(stats_path(cfg.out), json.dumps(stats, indent=2) + "\n")
    log.info(
        "sft-data: %d train + %d held-out examples from %d files -> %s (%s)",
        len(train),
        len(val),
        counts["files"],
        cfg.out,
        dict(counts),
    )
    return stats

"""``genloop serve``: the OpenAI-compatible server over a checkpoint, with RAG (the application: ``serve.app``).

``--smoke N`` starts the server, answers N sample requests through the official ``openai`` client, prints them
and exits (``make demo`` ends this way).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from cluster.commands.base import add_stage_command, address_of, config_from_args, start_ray

HELP = "serve a checkpoint over OpenAI-compatible HTTP with RAG (Ray Serve + vLLM)"

# --smoke without --smoke-questions: code-writing requests in the instruction set's form (pipelines/sft/data.py
# WRITE_PROMPTS) on small functions; with a `genloop sft-data` artifact, its held-out requests are asked instead.
SMOKE_FUNCTIONS = [
    ("def is_even(n)", "Return True if n is even."),
    ("def reverse_words(text)", "Return the words of text in reverse order, joined by single spaces."),
    ("def clamp(x, lo, hi)", "Limit x to the closed interval from lo to hi."),
    ("def count_vowels(s)", "Return how many characters of s are vowels."),
]


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = add_stage_command(
        sub,
        "serve",
        HELP,
        {
            "--model": ("model", {"metavar": "CKPT", "help": "checkpoint folder (Hugging Face format)"}),
            "--model-name": (
                "model_name",
                {"metavar": "NAME", "help": "name clients send as 'model' (else: folder name)"},
            ),
            "--knowledge": (
                "knowledge",
                {"metavar": "DIR_OR_DB", "help": "knowledge store: a .db file or a folder holding knowledge.db"},
            ),
            "--api-key-file": ("api_key_file", {"metavar": "F", "help": "one API key per line; keys then required"}),
            "--admin-key-file": (
                "admin_key_file",
                {
                    "metavar": "F",
                    "help": "admin keys (one per line) for POST "
                    "/admin/models and `genloop deploy`; none: admin routes off",
                },
            ),
            "--host": ("host", {"help": "HTTP host (preset default 127.0.0.1: loopback only)"}),
            "--port": ("port", {"type": int, "help": "HTTP port (preset default 8000)"}),
        },
        examples="rag_top_k=5 engine.max_num_seqs=8",
        overwrite=False,
    )
    p.add_argument(
        "--smoke",
        type=int,
        default=0,
        metavar="N",
        help="start, answer N code-writing requests with the openai client, print each answer, whether "
        "it parses as a function and which sources retrieval found, and exit",
    )
    p.add_argument(
        "--smoke-questions",
        default=None,
        metavar="FILE_OR_DIR",
        help="the held-out requests to ask: a `genloop sft-data` folder (its val.jsonl) or a JSONL of "
        "{messages: [...]}; default: a few built-in ones",
    )
    p.add_argument("--smoke-out", default=None, metavar="FILE", help="also write the smoke answers as JSON here")
    return p


def smoke_questions(source: str | None, n: int) -> list[str]:
    """``n`` code-writing requests: the held-out ``write`` tasks of an instruction set (in file order), else the
    built-in ones in the same form."""
    import json

    from pipelines.sft.data import WRITE_PROMPTS, val_path

    if not source:
        qs = [
            WRITE_PROMPTS[i % len(WRITE_PROMPTS)].format(sig=sig, doc=doc)
            for i, (sig, doc) in enumerate(SMOKE_FUNCTIONS)
        ]
        return [qs[i % len(qs)] for i in range(n)]
    path = Path(val_path(source) if Path(source).is_dir() else source)
    if not path.is_file():
        raise FileNotFoundError(
            f"--smoke-questions {source}: no {path}; pass a `genloop sft-data` folder or a JSONL "
            'of {"messages": [...]} rows'
        )
    qs = []
    for line in path.read_text().splitlines():
        row = json.loads(line) if line.strip() else {}
        if row.get("meta", {}).get("task", "write") != "write":
            continue
        user = [m["content"] for m in row.get("messages", []) if m.get("role") == "user"]
        if user:
            qs.append(user[0])
        if len(qs) == n:
            break
    if not qs:
        raise ValueError(
            f"--smoke-questions {path} holds no code-writing requests (rows with meta.task 'write' and a user message)"
        )
    return qs


def smoke(base_url: str, model: str, questions: list[str], api_key: str | None = None) -> list[dict]:
    """Ask each question through the official ``openai`` client (greedy, the server's default max_tokens; every
    other one streamed), print the answer, whether it parses as a function and the sources retrieval found; then
    one feedback round (``cluster/feedback_round.py``: ratings and preferences posted as a user would). Returns the
    answers as dicts."""
    import openai

    from pipelines.judge import writes_function

    client = openai.OpenAI(base_url=base_url + "/v1", api_key=api_key or "none", max_retries=0, timeout=120)
    print(
        f"models: {[(m.id, (m.model_extra or {}).get('model_version')) for m in client.models.list().data]} "
        "(name, model version)"
    )
    results = []
    for i, q in enumerate(questions):
        t0 = time.perf_counter()
        msgs = [{"role": "user", "content": q}]
        streamed = i % 2 == 1
        if streamed:
            pieces, rag, version = [], {}, None
            for ch in client.chat.completions.create(
                model=model, messages=msgs, temperature=0.0, stream=True, user="demo-user"
            ):
                rag = rag or (ch.model_extra or {}).get("rag") or {}
                version = version or (ch.model_extra or {}).get("model_version")
                if ch.choices and ch.choices[0].delta.content:
                    pieces.append(ch.choices[0].delta.content)
            answer, rid, tokens = "".join(pieces), None, None
        else:
            r = client.chat.completions.create(model=model, messages=msgs, temperature=0.0, user="demo-user")
            answer, rid, tokens = r.choices[0].message.content or "", r.id, r.usage.completion_tokens
            rag = (r.model_extra or {}).get("rag") or {}
            version = (r.model_extra or {}).get("model_version")
        res = {
            "question": q,
            "answer": answer,
            "parses": writes_function(answer),
            "sources": [d["id"] for d in rag.get("documents", [])],
            "streamed": streamed,
            "tokens": tokens,
            "seconds": round(time.perf_counter() - t0, 2),
            "response_id": rid,
            "model_version": version,
        }
        results.append(res)
        print(
            f"\n[{i + 1}] {q}\n    answer{' (streamed)' if streamed else ''}: {answer!r}\n"
            f"    parses as a function: {'yes' if res['parses'] else 'no'}; retrieval found: "
            f"{', '.join(res['sources']) or 'nothing'}; {res['seconds']:.2f}s"
        )
    from cluster.feedback_round import feedback_round

    posted = feedback_round(client, model, questions, results)
    print(
        f"\nfeedback round: {posted['ratings']} ratings ({posted['up']} up, {posted['down']} down) and "
        f"{posted['preferences']} preferences posted through /v1/feedback"
    )
    return results


def api_key(path: str | None) -> str | None:
    """The first key in an API key file (comments and blank lines skipped)."""
    if not path:
        return None
    return next(
        (ln.strip() for ln in Path(path).read_text().splitlines() if ln.strip() and not ln.lstrip().startswith("#")),
        None,
    )


def config(args: argparse.Namespace):
    from serve.app import ServeConfig

    return config_from_args(ServeConfig, "serve", args)


def run(args: argparse.Namespace) -> int:
    import os

    from ray import serve

    from serve.app import start
    from serve.config import check_config, ray_env

    cfg = config(args)
    check_config(cfg)  # a missing checkpoint fails here, before Ray starts
    os.environ.update(ray_env(cfg, address_of(args)))  # read by the local Ray's Serve processes at start
    start_ray(args)
    url = start(cfg)
    print(
        f"genloop serve: {cfg.served_name()!r} at {url}/v1 (OpenAI-compatible); knowledge store "
        f"{cfg.state_paths()[0]}; Ctrl-C stops",
        flush=True,
    )
    try:
        if args.smoke:
            results = smoke(
                url, cfg.served_name(), smoke_questions(args.smoke_questions, args.smoke), api_key(cfg.api_key_file)
            )
            if args.smoke_out:
                Path(args.smoke_out).parent.mkdir(parents=True, exist_ok=True)
                versions = sorted({r["model_version"] for r in results if r["model_version"]})
                Path(args.smoke_out).write_text(
                    json.dumps(
                        {"model": cfg.served_name(), "url": url, "model_versions": versions, "answers": results},
                        indent=2,
                    )
                    + "\n"
                )
            return 0
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        return 0
    finally:
        serve.delete(cfg.app_name)

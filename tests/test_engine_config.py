"""models/engine.py's engine arguments (no engine is built here; test_rlhf.py and the serve tests build real ones)."""

from models.engine import EngineConfig, engine_kwargs


def test_engine_kwargs_on_cpu():
    kw = engine_kwargs("ckpt", EngineConfig(max_model_len=128, max_num_seqs=4))
    assert kw["enforce_eager"] is True  # default on CPU: no compile at engine start
    assert kw["dtype"] == "float32" and kw["skip_tokenizer_init"] is True
    assert kw["max_model_len"] == 128 and kw["max_num_seqs"] == 4 and "gpu_memory_utilization" not in kw
    assert engine_kwargs("ckpt", EngineConfig(enforce_eager=False))["enforce_eager"] is False  # asked for: honoured
    assert engine_kwargs("ckpt", EngineConfig(extra={"enable_prefix_caching": False}))["enable_prefix_caching"] is False


def test_seeded_sampling_survives_prompts_over_one_steps_token_budget(tiny_checkpoint):
    """64 prompts x 100 tokens is more than one engine step's 4096-token budget: vLLM 0.32 on CPU chunks such a
    prefill and then dies on a seeded request ("CPU Generator does not use offset") unless prefills stay whole."""
    from models.checkpoint import load_tokenizer
    from pipelines.rlhf.rollout import RolloutWorker, SamplingConfig

    tok = load_tokenizer(tiny_checkpoint)
    worker = RolloutWorker(
        str(tiny_checkpoint), EngineConfig(max_model_len=128, max_num_seqs=64), [tok.eot_id, tok.im_end_id]
    )
    prompts = [[(7 * i + j) % 200 + 10 for j in range(100)] for i in range(64)]
    sampling = SamplingConfig(max_new_tokens=8, temperature=1.0)
    first = worker.generate(prompts, 2, sampling, list(range(64)))
    assert len(first) == 64 and all(len(g) == 2 and len(c.logprobs) == len(c.token_ids) > 0 for g in first for c in g)
    again = worker.generate(prompts, 2, sampling, list(range(64)))
    assert [[c.token_ids for c in g] for g in again] == [[c.token_ids for c in g] for g in first]  # seeded: the same

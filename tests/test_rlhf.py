"""``genloop rlhf`` on real Ray and real vLLM (the tiny preset): after an update every engine decodes what the
learner's weights decode; a verifiable toy reward rises under GRPO and PPO; a killed rollout actor and a killed
learner rank both restart the run from its last checkpoint. All runs share two rollout engines (their weights are
pushed in at the start of each run), so vLLM starts once."""

import json
import os

import pytest

from tests.helpers import TOY_REWARD

pytestmark = pytest.mark.slow

GREEDY_TOKENS = 24


@pytest.fixture(scope="module")
def toy_inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("rlhf_inputs")
    (d / "toy_reward.py").write_text(TOY_REWARD)
    with open(d / "prompts.jsonl", "w") as f:
        for i in range(16):
            f.write(
                json.dumps(
                    {
                        "messages": [
                            {"role": "user", "content": f"Write a Python function `f{i}(x)` that returns x plus {i}."},
                            {"role": "assistant", "content": f"def f{i}(x):\n    return x + {i}"},
                        ],
                        "meta": {"task": "write"},
                        "fname": f"f{i}",
                        "plus": i,
                    }
                )
                + "\n"
            )  # columns, for reward functions that read them
    return d


def tiny_config(policy, inputs, out, *overrides):
    from pipelines.config import apply_overrides, from_dict, load_yaml, section_for
    from pipelines.rlhf.config import RlhfConfig

    base = section_for(load_yaml("tiny"), "rlhf", RlhfConfig)
    base.update(
        policy=str(policy),
        prompts=str(inputs / "prompts.jsonl"),
        out=str(out),
        reward=f"fn:{inputs / 'toy_reward.py'}:whitespace",
    )
    return from_dict(RlhfConfig, apply_overrides(base, list(overrides)))


@pytest.fixture(scope="module")
def engines(ray_session, tiny_checkpoint, toy_inputs, tmp_path_factory):
    """Two rollout actors over the tiny checkpoint, shared by every run in this module."""
    from pipelines.rlhf.stage import plan, start_engines

    cfg = tiny_config(tiny_checkpoint, toy_inputs, tmp_path_factory.mktemp("unused"), "rollout.engines=2")
    actors = start_engines(cfg, plan(cfg), use_gpu=False)
    yield actors
    for a in actors:
        ray_session.kill(a)


def engine_greedy(ray, actors, prompts):
    return [ray.get(a.greedy.remote(prompts, GREEDY_TOKENS)) for a in actors]


def learner_greedy(ckpt, prompts, stop_ids):
    from models.checkpoint import load_checkpoint
    from models.transformer import generate

    model, _ = load_checkpoint(ckpt)
    return [generate(model, p, GREEDY_TOKENS, stop_ids=tuple(stop_ids)) for p in prompts]


def rewards(history):
    return [r["reward_mean"] for r in history]


def test_engines_decode_what_genloop_decodes_before_and_after_a_weight_push(ray_session, engines, tiny_checkpoint):
    """vLLM (the CPU build) loads a genloop checkpoint as is and greedy-decodes exactly what genloop's own module
    decodes; a state dict pushed into a running engine (``update_from_state``: models/engine.update_weights, the
    weight-sync worker extension) takes effect in place. (Was test_vllm_interop.py with an engine of its own; the
    module's engines hold the same checkpoint, and every run below pushes its own weights in first.)"""
    import torch

    from models.checkpoint import load_checkpoint
    from models.transformer import generate

    model, tok = load_checkpoint(tiny_checkpoint)
    stop = (tok.eot_id, tok.im_end_id)
    prompts = [tok.encode("def hello(name):\n"), tok.encode("import os\nimport sys\n"), tok.encode("class A:")]
    ours = [generate(model, p, GREEDY_TOKENS, stop_ids=stop) for p in prompts]
    assert engine_greedy(ray_session, engines, prompts) == [ours, ours]
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.add_(torch.randn_like(p))
    updated = [generate(model, p, GREEDY_TOKENS, stop_ids=stop) for p in prompts]
    assert updated != ours
    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied: the embedding carries it
    ray_session.get(engines[0].update_from_state.remote(state, 0))
    assert ray_session.get(engines[0].greedy.remote(prompts, GREEDY_TOKENS)) == updated
    assert ray_session.get(engines[1].greedy.remote(prompts, GREEDY_TOKENS)) == ours  # the other engine untouched


def test_after_one_update_every_engine_decodes_the_learners_new_weights(
    ray_session, engines, tiny_checkpoint, toy_inputs, tmp_path
):
    from models.checkpoint import load_tokenizer
    from pipelines.rlhf.stage import run

    tok = load_tokenizer(tiny_checkpoint)
    stop = [tok.eot_id, tok.im_end_id]
    prompts = [tok.encode("def hello(name):\n"), tok.encode("import os\nimport sys\n"), tok.encode("class A:")]
    before = learner_greedy(tiny_checkpoint, prompts, stop)
    # the reward: a reward model (in its own actor) weighted with the toy function
    from models.scalar_model import from_causal_lm, save_scalar_model

    rm, rm_tok = from_causal_lm(tiny_checkpoint)
    save_scalar_model(rm, rm_tok, tmp_path / "rm")
    cfg = tiny_config(
        tiny_checkpoint,
        toy_inputs,
        tmp_path / "one",
        "rollout.engines=2",
        "iterations=1",
        f"reward=rm:{tmp_path / 'rm'}:0.5,fn:{toy_inputs / 'toy_reward.py'}:whitespace",
    )
    res = run(cfg, engines=engines)
    after = learner_greedy(res.model_dir, prompts, stop)
    assert after != before, "one update did not change the policy's greedy answers"
    assert engine_greedy(ray_session, engines, prompts) == [after, after]
    row = res.history[0]
    assert {"reward/rm", "reward/toy_reward.whitespace"} <= set(row)
    assert row["reward_mean"] == pytest.approx(0.5 * row["reward/rm"] + row["reward/toy_reward.whitespace"])
    assert row["sync_s"] > 0 and row["rollout_tokens_per_s"] > 0 and row["mismatch_kl"] < 1e-3

    # --overwrite at another lr trains afresh from the policy (nothing resumed); a plain re-run is refused
    from dataclasses import replace

    from pipelines.artifacts import ArtifactError
    from tests.helpers import model_weights, weights_differ

    before = model_weights(tmp_path / "one" / "model")
    again = run(replace(cfg, overwrite=True, train=replace(cfg.train, lr=cfg.train.lr / 3)), engines=engines)
    assert [r["iteration"] for r in again.history] == [1]
    after = model_weights(tmp_path / "one" / "model")
    assert weights_differ(before, after)
    with pytest.raises(ArtifactError, match="already holds a finished rlhf artifact"):
        run(cfg, engines=engines)
    assert not weights_differ(after, model_weights(tmp_path / "one" / "model"))


@pytest.mark.parametrize("algo", ["grpo", "ppo"])
def test_toy_reward_rises_with_real_vllm_actors(ray_session, engines, tiny_checkpoint, toy_inputs, tmp_path, algo):
    from models.checkpoint import load_checkpoint
    from pipelines.artifacts import read_manifest
    from pipelines.rlhf.stage import run

    out = tmp_path / algo
    res = run(tiny_config(tiny_checkpoint, toy_inputs, out, f"algo={algo}", "rollout.engines=2"), engines=engines)
    r = rewards(res.history)
    assert len(r) == 10
    start, end = sum(r[:2]) / 2, sum(r[-2:]) / 2
    assert end > start + 0.15, f"{algo}: mean reward did not rise clearly: {[round(x, 3) for x in r]}"
    keys = {
        "reward_mean",
        "reward_std",
        "reward/toy_reward.whitespace",
        "kl",
        "entropy",
        "response_len",
        "clip_frac",
        "mismatch_kl",
        "rollout_tokens_per_s",
        "learner_tokens_per_s",
        "sync_s",
        "t_generate",
        "t_score",
        "t_learn",
        "t_sync",
    }
    assert keys <= set(res.history[-1])
    if algo == "ppo":
        assert "value_loss" in res.history[-1]
    for f in ("metrics.csv", "metrics.jsonl", "reward_curve.png", "model/config.json"):
        assert (out / f).exists(), f
    m = read_manifest(str(out))
    assert m["stage"] == "rlhf" and m["status"] == "finished" and m["counts"]["iterations"] == 10
    load_checkpoint(out / "model")  # the final policy is a checkpoint genloop (and so serve) loads


def test_oversampled_groups_that_differ_fill_the_batch_first(
    ray_session, engines, tiny_checkpoint, toy_inputs, tmp_path
):
    """``rollout.oversample=3``: 3 x 4 groups sampled, the 4 trained on are the ones whose filter part differs first,
    so the batch's kept share is min(informative groups, 4) / 4, whatever the share among all sampled groups."""
    from pipelines.rlhf.stage import run

    fn = f"fn:{toy_inputs / 'toy_reward.py'}"
    cfg = tiny_config(
        tiny_checkpoint,
        toy_inputs,
        tmp_path / "over",
        "rollout.engines=2",
        "iterations=3",
        "rollout.oversample=3",
        "update.filter_groups=toy_reward.length_mod5",
        f"reward={fn}:whitespace,{fn}:length_mod5,{fn}:columns_match:0",
    )
    res = run(cfg, engines=engines)
    assert len(res.history) == 3
    for row in res.history:
        # every answer of the 12 groups sampled (4 per prompt, prompts in a seeded order) got its own row's columns
        assert row["reward/toy_reward.columns_match"] == 1.0, row
        informative = round(row["groups_informative"] * 12)  # of the 12 groups sampled
        assert row["groups_kept"] == pytest.approx(min(informative, 4) / 4), row
    assert any(row["groups_kept"] > row["groups_informative"] for row in res.history)  # the pick did something


def test_killed_rollout_actor_and_learner_rank_restart_from_the_last_checkpoint(
    ray_session, engines, tiny_checkpoint, toy_inputs, tmp_path
):
    from pipelines.rlhf.stage import run

    out = tmp_path / "faults"
    fn = f"fn:{toy_inputs / 'toy_reward.py'}"
    cfg = tiny_config(
        tiny_checkpoint,
        toy_inputs,
        out,
        "rollout.engines=2",
        "iterations=4",
        "train.ckpt_every=1",
        "rollout.inject_failure_at=1",
        "train.inject_failure_at=3",
        f"reward={fn}:whitespace,{fn}:columns_match:0",
    )
    res = run(cfg, engines=engines)
    # after both restarts the resumed iterations' answers still got their own rows' columns
    assert [r["reward/toy_reward.columns_match"] for r in res.history] == [1.0] * 4
    assert (out / ".faults" / ".injected_rollout_failure_1").exists()
    assert (out / ".faults" / ".injected_learner_failure_3").exists()
    assert [r["iteration"] for r in res.history] == [1, 2, 3, 4]  # each iteration once: resumed, not restarted
    assert (out / "model" / "config.json").exists()
    # the restarted engine took the resumed weights: it decodes what the final policy decodes
    from models.checkpoint import load_tokenizer

    tok = load_tokenizer(tiny_checkpoint)
    prompts = [tok.encode("def hello(name):\n")]
    want = learner_greedy(res.model_dir, prompts, [tok.eot_id, tok.im_end_id])
    assert engine_greedy(ray_session, engines, prompts) == [want, want]
    assert os.path.isdir(out / "train_runs" / "rlhf")

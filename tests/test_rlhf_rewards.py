"""RLHF reward functions and inputs (no Ray): built-ins by name, a user's file, clear errors for a function that
raises or returns the wrong length, a reward model with another tokenizer, bad prompt files."""

import json

import pytest

from pipelines.rewards import RewardError, RewardSet, parse_reward_spec

PROMPT = "Write a Python function `add(a, b)` that returns the sum of a and b."
GOOD = "```python\ndef add(a, b):\n    total = a + b\n    return total\n```"


def test_builtin_by_name_with_weights_and_parts():
    rs = RewardSet.from_spec("fn:code_judge:0.5,fn:writes_function")
    total, parts = rs.score([PROMPT, PROMPT], [GOOD, "no code here"])
    assert parts["code_judge"][0] == 1.0 and parts["writes_function"] == [1.0, 0.0]
    assert total[0] == pytest.approx(0.5 * 1.0 + 1.0)
    assert total[1] == pytest.approx(0.5 * parts["code_judge"][1])
    # judge_pass: the judge's top grade only; signature_match: the def line against the requested one
    rs = RewardSet.from_spec("fn:judge_pass,fn:signature_match:0.5")
    named_only = "def add(x, y):\n    return x + y"  # the requested name, other parameters: judge 0.75
    total, parts = rs.score([PROMPT] * 3, [GOOD, named_only, "no code here"])
    assert parts["judge_pass"] == [1.0, 0.0, 0.0]
    assert parts["signature_match"][0] == 1.0 and 0.0 < parts["signature_match"][1] < 1.0
    assert total == pytest.approx([1.5, 0.5 * parts["signature_match"][1], 0.0])
    with pytest.raises(RewardError, match="unknown reward function 'nope'.*code_judge"):
        parse_reward_spec("fn:nope")
    with pytest.raises(RewardError, match="empty"):
        parse_reward_spec(" , ")


def test_user_file_function(tmp_path):
    f = tmp_path / "my_reward.py"
    f.write_text("def length(prompts, responses):\n    return [len(r) / 10 for r in responses]\n")
    rs = RewardSet.from_spec(f"fn:{f}:length:2")
    assert rs.parts[0].name == "my_reward.length" and rs.parts[0].weight == 2.0
    total, parts = rs.score(["p", "p"], ["abcde", ""])
    assert parts["my_reward.length"] == [0.5, 0.0] and total == [1.0, 0.0]
    with pytest.raises(RewardError, match="has no function 'missing'"):
        RewardSet.from_spec(f"fn:{f}:missing")
    with pytest.raises(RewardError, match="does not exist"):
        RewardSet.from_spec(f"fn:{tmp_path}/absent.py:f")


def test_raising_wrong_length_and_non_finite_functions_are_clear_errors(tmp_path):
    f = tmp_path / "bad.py"
    f.write_text(
        "def boom(prompts, responses):\n    raise KeyError('oops')\n"
        "def short(prompts, responses):\n    return [1.0]\n"
        "def nan(prompts, responses):\n    return [float('nan')] * len(responses)\n"
        "def text(prompts, responses):\n    return 'abc'\n"
    )
    with pytest.raises(RewardError, match=r"bad.boom raised KeyError: 'oops'"):
        RewardSet.from_spec(f"fn:{f}:boom").score(["p"] * 2, ["a", "b"])
    with pytest.raises(RewardError, match=r"bad.short returned 1 scores for 2 answers"):
        RewardSet.from_spec(f"fn:{f}:short").score(["p"] * 2, ["a", "b"])
    with pytest.raises(RewardError, match=r"bad.nan returned a non-finite score"):
        RewardSet.from_spec(f"fn:{f}:nan").score(["p"] * 2, ["a", "b"])
    with pytest.raises(RewardError, match=r"bad.text must return a list of numbers"):
        RewardSet.from_spec(f"fn:{f}:text").score(["p"] * 2, ["a", "b"])


def test_reward_model_spec_and_tokenizer_mismatch_refused_before_any_work(tmp_path, tiny_checkpoint, tiny_tokenizer):
    import torch

    from models.scalar_model import ScalarModel, save_scalar_model
    from models.tokenizer import train
    from models.transformer import model_preset
    from pipelines.rlhf.config import RlhfConfig
    from pipelines.rlhf.stage import plan

    parts = parse_reward_spec(f"rm:{tmp_path}/rm:0.3,fn:code_judge")
    assert (parts[0].kind, parts[0].target, parts[0].weight) == ("rm", f"{tmp_path}/rm", 0.3)
    other = train(["def f(x):\n    return x * 2\n" * 50, "class A:\n    pass\n" * 50], vocab_size=400)
    torch.manual_seed(0)
    save_scalar_model(ScalarModel(model_preset("tiny").for_tokenizer(other.n_vocab)), other, tmp_path / "rm")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(
        json.dumps({"messages": [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": GOOD}]}) + "\n"
    )
    cfg = RlhfConfig(
        policy=str(tiny_checkpoint),
        reward=f"{tmp_path}/rm,fn:code_judge",
        prompts=str(prompts),
        out=str(tmp_path / "out"),
    )
    with pytest.raises(RewardError, match="different|uses tokenizer"):
        plan(cfg)
    assert not (tmp_path / "out").exists()  # refused before any work


def test_bad_prompt_lines_are_counted_and_none_usable_is_one_clear_error(tmp_path, tiny_checkpoint):
    from models.chat import ChatFormat
    from models.checkpoint import load_tokenizer
    from pipelines.rlhf.experience import load_prompts, prompt_order

    tok, fmt = load_tokenizer(tiny_checkpoint), ChatFormat.from_checkpoint(tiny_checkpoint)
    good = {
        "messages": [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": GOOD}],
        "meta": {"task": "write"},
    }
    explain = {
        "messages": [{"role": "user", "content": "What does this do?"}, {"role": "assistant", "content": "It adds."}],
        "meta": {"task": "explain"},
    }
    f = tmp_path / "p.jsonl"
    f.write_text("\n".join([json.dumps(good), "{not json", json.dumps({"text": "x"}), json.dumps(explain)]) + "\n")
    ps = load_prompts(str(f), tok, fmt, max_prompt_tokens=200, tasks=["write"])
    assert len(ps) == 1 and ps.texts == [PROMPT]
    assert ps.counts["bad_json"] == 1 and ps.counts["bad_missing_fields"] == 1 and ps.counts["other_task"] == 1
    assert tok.decode(ps.ids[0]).endswith("assistant\n")  # ends in the assistant header: the model answers next
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n[1, 2]\n")
    with pytest.raises(ValueError, match=r"bad.jsonl: no usable prompt .*expected JSONL lines"):
        load_prompts(str(bad), tok, fmt, max_prompt_tokens=200)
    # the order is a seeded permutation per epoch, the same for a resumed run
    order = [prompt_order(5, it, 3, seed=1) for it in range(4)]
    assert sorted(order[0] + order[1][:2]) == list(range(5)) and order == [prompt_order(5, it, 3, 1) for it in range(4)]


def test_reward_model_worker_scores_the_last_token_and_combines_with_functions(tmp_path, tiny_checkpoint):
    import torch

    from models.scalar_model import from_causal_lm, save_scalar_model
    from pipelines.rewards import RewardModelWorker

    rm, tok = from_causal_lm(tiny_checkpoint)
    save_scalar_model(rm, tok, tmp_path / "rm")
    worker = RewardModelWorker(str(tmp_path / "rm"), tok.pad_id, micro_batch_size=1)
    scores = worker.score([[5, 6, 7], [5, 6]], [[8, 9], [10, 11, 12]])
    with torch.no_grad():
        want = [float(rm(torch.tensor([s]))[0, -1]) for s in ([5, 6, 7, 8, 9], [5, 6, 10, 11, 12])]
    assert scores == pytest.approx(want, abs=1e-5)
    rs = RewardSet.from_spec(f"rm:{tmp_path / 'rm'}:0.5,fn:writes_function")
    total, parts = rs.score(["p", "p"], [GOOD, "x"], lambda: scores)
    assert parts["rm"] == scores and total == pytest.approx([0.5 * scores[0] + 1.0, 0.5 * scores[1]])
    with pytest.raises(RewardError, match="no reward-model scorer"):
        rs.score(["p"], ["x"])

"""Verifiable rewards (issue 22), without Ray: prompt rows with columns, columns passed to reward functions per answer
(TRL's convention), the built-in answer checkers against hand-computed values, a missing column refused before any
rollout, ``genloop tasks arithmetic`` splits, and the eval intervals against a hand computation."""

import json
import math
from collections import Counter

import pytest

from pipelines.rewards import (
    RewardError,
    RewardSet,
    column_use,
    concise_answer,
    exact_answer,
    last_number,
    number_answer,
)


# ---- prompt rows ---------------------------------------------------------------------------------------------------
def test_prompt_rows_take_prompt_or_messages_and_keep_other_fields_as_columns(tmp_path):
    from pipelines.conversations import parse_prompt_record, read_prompt_rows

    msgs, ref, cols, why = parse_prompt_record({"prompt": "Compute 2+3.", "answer": "5", "system": "Be brief."})
    assert why == "" and ref == "" and cols == {"answer": "5"}
    assert msgs == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Compute 2+3."}]
    # messages: a final assistant turn is optional, and is the reference answer, not part of the prompt
    convo = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    assert parse_prompt_record({"messages": convo, "id": 7})[:3] == (convo[:1], "Hello", {"id": 7})
    assert parse_prompt_record({"messages": convo[:1]})[:2] == (convo[:1], "")
    # sft-data's {"prompt", "response"} rows: the response is the reference, and a column
    assert parse_prompt_record({"prompt": "Q", "response": "A"})[1:3] == ("A", {"response": "A"})
    assert parse_prompt_record({"messages": [{"role": "assistant", "content": "x"}]})[3] == "no_user_turn"
    assert parse_prompt_record({"prompt": 3})[3] == "bad_content"
    assert parse_prompt_record({"text": "x"})[3] == "missing_fields"
    f = tmp_path / "p.jsonl"
    f.write_text("\n".join([json.dumps({"prompt": "a", "answer": "1"}), "{bad", json.dumps({"messages": convo})]))
    counts: Counter = Counter()
    rows = read_prompt_rows(str(f), counts)
    assert [r[2] for r in rows] == [{"answer": "1"}, {}] and counts["bad_json"] == 1 and counts["lines"] == 3


def test_sft_reads_task_rows_answer_as_response_and_stays_strict():
    """SFT on a task's train split (the warm-up before RL): the ``answer`` is the assistant turn; a row with neither
    response nor answer, or no assistant turn, is still refused."""
    from pipelines.conversations import parse_record

    assert parse_record({"prompt": "Compute 2+3.", "answer": "5", "a": 2}) == (
        [{"role": "user", "content": "Compute 2+3."}, {"role": "assistant", "content": "5"}],
        "",
    )
    assert parse_record({"prompt": "Compute 2+3.", "response": "five", "answer": "5"})[0][-1]["content"] == "five"
    assert parse_record({"prompt": "Compute 2+3."}) == (None, "missing_fields")
    assert parse_record({"messages": [{"role": "user", "content": "Hi"}]}) == (None, "no_assistant_turn")


def test_load_prompts_reads_prompt_rows_with_columns_aligned(tmp_path, tiny_checkpoint):
    from models.chat import ChatFormat
    from models.checkpoint import load_tokenizer
    from pipelines.rlhf.experience import load_prompts

    tok, fmt = load_tokenizer(tiny_checkpoint), ChatFormat.from_checkpoint(tiny_checkpoint)
    f = tmp_path / "p.jsonl"
    f.write_text(
        "\n".join(
            json.dumps(r)
            for r in [
                {"prompt": "Compute 1+1.", "answer": "2"},
                {"messages": [{"role": "user", "content": "Compute 2+2."}], "answer": "4", "level": 1},
                {"messages": [{"role": "user", "content": "Compute 3+3."}, {"role": "assistant", "content": "6"}]},
            ]
        )
        + "\n"
    )
    ps = load_prompts(str(f), tok, fmt, max_prompt_tokens=200)
    assert ps.texts == ["Compute 1+1.", "Compute 2+2.", "Compute 3+3."]
    assert ps.columns == {"answer": ["2", "4", None], "level": [None, 1, None]}
    assert all(tok.decode(i).endswith("assistant\n") for i in ps.ids)
    # one value per answer: groups of 3 over prompts [2, 0] (a shuffled order)
    assert ps.columns_for([2, 0], 3)["answer"] == [None] * 3 + ["2"] * 3


# ---- columns into reward functions ---------------------------------------------------------------------------------
def test_reward_functions_get_the_columns_they_take(tmp_path):
    f = tmp_path / "cols.py"
    f.write_text(
        "def plain(prompts, responses):\n    return [1.0] * len(responses)\n"
        "def named(prompts, responses, answer, level=0):\n"
        "    return [float(r == a) + 10 * (level or 0) for r, a in zip(responses, answer)]\n"
        "def kw(prompts, responses, **cols):\n    return [float(len(cols))] * len(responses)\n"
    )
    rs = RewardSet.from_spec(f"fn:{f}:plain,fn:{f}:named,fn:{f}:kw")
    cols = {"answer": ["1", "2"], "other": ["x", "y"]}
    total, parts = rs.score(["p", "q"], ["1", "3"], columns=cols)
    assert parts == {"cols.plain": [1.0, 1.0], "cols.named": [1.0, 0.0], "cols.kw": [2.0, 2.0]}
    assert total == [4.0, 3.0]
    assert column_use(rs.fns["cols.named"]).required == {"answer"}
    assert rs.required_columns() == {"cols.named": frozenset({"answer"})}
    # a required column missing from the rows: one clear error naming the function, the column and the count
    with pytest.raises(RewardError, match=r"fn:cols.named needs the column 'answer', which 2 of 2 rows lack"):
        rs.check_columns({"other": ["x", "y"]}, 2)
    with pytest.raises(RewardError, match=r"which 1 of 2 rows lack"):
        rs.check_columns({"answer": ["1", None]}, 2)
    rs.check_columns({"answer": ["1", "2"]}, 2)
    with pytest.raises(RewardError, match="fn:exact_answer needs the column 'answer'"):
        RewardSet.from_spec("fn:exact_answer,fn:code_judge").check_columns({"meta": [{}]}, 1)


# ---- the built-in answer checkers ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text,want",
    [
        ("85", 85.0),
        ("The sum is 1,085.", 1085.0),
        ("-5", -5.0),
        ("x = -3.25.", -3.25),
        ("47+38=85", 85.0),
        ("10-3", 3.0),
        ("1,234,567 apples", 1234567.0),
        ("1,2,3", 3.0),
        (".5", 0.5),
        ("Answer: -1,234.50.", -1234.5),
        ("no number", None),
        ("", None),
    ],
)
def test_last_number(text, want):
    assert last_number(text) == want


def test_exact_and_number_answer_against_hand_values():
    responses = ["85", " 85\n", "85.", "The answer is 85.", "-12", "1,085", "3.50", "eighty-five", "8 5"]
    answers = ["85", "85", "85", "85", -12, "1085", "3.5", "85", "85"]
    assert exact_answer([""] * 9, responses, answers) == [1.0, 1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    assert number_answer([""] * 9, responses, answers) == [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0]
    assert number_answer(["", ""], ["7", "7"], ["seven", None]) == [0.0, 0.0]  # an answer that is not a number
    # concise: right number x len(answer) / len(response), spaces not counted: 2/2, 2/2, 2/3, 2/14, 3/3, 0 (wrong),
    # 2/8 with spaces and without (dropping them gains nothing)
    responses = ["85", " 85\n", "85.", "The answer is 85.", "-12", "84", "47 + 38 = 85", "47+38=85"]
    got = concise_answer([""] * 8, responses, [85, "85", 85, 85, -12, 85, 85, 85])
    assert got == [1.0, 1.0, 2 / 3, 2 / 14, 1.0, 0.0, 2 / 8, 2 / 8]


# ---- genloop tasks arithmetic --------------------------------------------------------------------------------------
def test_arithmetic_splits_share_no_problem_and_are_deterministic(tmp_path):
    from pipelines.tasks import ArithmeticConfig, arithmetic_problems, problem_key, run_arithmetic

    train, held = arithmetic_problems(3000, 256, digits=2, ops="+,-", seed=3)
    assert len(train) == 3000 and len(held) == 256
    keys = [problem_key(r["a"], r["op"], r["b"]) for r in train + held]
    assert len(set(keys)) == len(keys)  # no problem twice, in a split or across them (47+38 is 38+47)
    for r in train[:50] + held[:50]:
        assert r["prompt"] == f"Compute {r['a']}{r['op']}{r['b']}. Reply with the number only."
        assert int(r["answer"]) == (r["a"] + r["b"] if r["op"] == "+" else r["a"] - r["b"])
        assert 10 <= r["a"] <= 99 and 10 <= r["b"] <= 99
    assert {r["op"] for r in train} == {"+", "-"}
    assert arithmetic_problems(3000, 256, digits=2, ops="+,-", seed=3) == (train, held)
    assert arithmetic_problems(3000, 256, digits=2, ops="+,-", seed=4) != (train, held)
    # a dense draw (most of the space) is still exact: 1-digit sums, 55 problems in all
    train, held = arithmetic_problems(45, 10, digits=1, ops="+")
    assert len({problem_key(r["a"], "+", r["b"]) for r in train + held}) == 55
    with pytest.raises(ValueError, match="only 55 distinct"):
        arithmetic_problems(50, 10, digits=1, ops="+")
    with pytest.raises(ValueError, match="--ops"):
        arithmetic_problems(5, 1, ops="/")
    res = run_arithmetic(ArithmeticConfig(out=str(tmp_path / "t"), n=40, heldout=8, seed=1))
    rows = {
        s: [json.loads(x) for x in (tmp_path / "t" / f"{s}.jsonl").read_text().splitlines()]
        for s in ("train", "heldout")
    }
    assert (len(rows["train"]), len(rows["heldout"])) == (40, 8) and res["space"] == 90 * 91 // 2
    assert not {r["prompt"] for r in rows["train"]} & {r["prompt"] for r in rows["heldout"]}
    assert json.loads((tmp_path / "t" / "manifest.json").read_text())["status"] == "finished"


def test_tasks_command_and_missing_column_refused_before_rollout(tmp_path, tiny_checkpoint, capsys):
    """``genloop tasks arithmetic`` rows feed ``fn:exact_answer``; rows without ``answer`` are refused by the plan
    (what ``genloop rlhf`` checks before Ray starts), before anything is written."""
    from cluster.cli import main
    from pipelines.rlhf.config import RlhfConfig
    from pipelines.rlhf.stage import plan

    assert main(["tasks", "arithmetic", "--out", str(tmp_path / "t"), "--n", "20", "--heldout", "4"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["heldout"] == 4
    ok = plan(
        RlhfConfig(
            policy=str(tiny_checkpoint),
            reward="fn:exact_answer,fn:number_answer:0.5",
            prompts=str(tmp_path / "t"),
            out=str(tmp_path / "out"),
        )
    )
    assert len(ok.prompts) == 20 and len(ok.prompts.columns["answer"]) == 20
    bare = tmp_path / "bare.jsonl"
    bare.write_text("".join(json.dumps({"prompt": f"Compute {i}+1."}) + "\n" for i in range(5)))
    cfg = RlhfConfig(
        policy=str(tiny_checkpoint), reward="fn:number_answer", prompts=str(bare), out=str(tmp_path / "out2")
    )
    with pytest.raises(RewardError, match=r"fn:number_answer needs the column 'answer', which 5 of 5 rows lack"):
        plan(cfg)
    assert not (tmp_path / "out2").exists()


# ---- eval intervals ------------------------------------------------------------------------------------------------
def test_eval_intervals_against_a_hand_computation():
    from pipelines.rlhf.evaluate import comparison_table, mean_interval, summarize_scores, wilson_interval

    # Wilson, 8 of 10, z = 1.96: p = 0.8, d = 1 + 3.8416/10 = 1.38416, centre = (0.8 + 0.19208)/d = 0.716738,
    # half = 1.96 * sqrt(0.016 + 0.009604)/d = 0.226581 -> [0.490157, 0.943319]
    p, lo, hi = wilson_interval(8, 10)
    assert (p, round(lo, 6), round(hi, 6)) == (0.8, 0.490157, 0.943319)
    # 0 of 20: centre = half = 0.09604/1.19208 = 0.080565 -> [0, 0.161130] (the normal interval would be [0, 0])
    assert [round(x, 6) for x in wilson_interval(0, 20)] == [0.0, 0.0, 0.16113]
    # mean of 1, 2, 3, 4: 2.5, sd = sqrt(5/3) = 1.290994, half = 1.96 * 1.2909944 / 2 = 1.2651745
    m, lo, hi = mean_interval([1.0, 2.0, 3.0, 4.0])
    assert (m, round(lo, 6), round(hi, 6)) == (2.5, 1.234825, 3.765175)
    assert math.isnan(mean_interval([1.0])[1])
    # sampled answers, 2 per prompt: the mean's interval is over per-prompt means (1, 0.5, 0), the pass rate over
    # the 6 answers (Wilson 3 of 6)
    s = summarize_scores([1.0, 1.0, 1.0, 0.0, 0.0, 0.0], samples=2)
    assert s["binary"] and s["pass_rate"] == 0.5 and (s["pass_lo"], s["pass_hi"]) == wilson_interval(3, 6)[1:]
    assert (s["mean"], s["mean_lo"]) == (0.5, mean_interval([1.0, 0.5, 0.0])[1])
    assert not summarize_scores([0.5, 1.0])["binary"]
    row = {
        "rewards": {"exact_answer": summarize_scores([1.0] * 8 + [0.0] * 2)},
        "judge_pass_rate": 0.0,
        "judge_mean": 0.0,
        "rm_score_mean": None,
        "kl_to_reference": 0.01,
        "answer_tokens_mean": 2.0,
        "prompts": 10,
        "samples_per_prompt": 1,
        "decoding": "greedy",
    }
    table = comparison_table(["sft", "grpo"], [row, row]).splitlines()
    assert table[0].split() == ["sft", "grpo"]
    assert table[1].startswith("exact_answer: pass rate (95% CI)") and table[1].count("80.0% [49.0%, 94.3%]") == 2
    assert any(line.startswith("KL to reference") for line in table)
    assert any(line.startswith("judge pass rate") for line in table)
    # arithmetic prompts ask for no function: the code judge has no verdict, and the table shows no judge rows
    unjudged = {**row, "judge_pass_rate": None, "judge_mean": None}
    table = comparison_table(["sft", "grpo"], [unjudged, unjudged])
    assert "judge" not in table and "exact_answer: pass rate" in table


def test_pref_data_scores_candidates_with_a_reward_reading_columns(tmp_path, tiny_checkpoint, monkeypatch):
    """``pref-data reward=fn:exact_answer`` on ``genloop tasks`` rows: every prompt row is used (not only code-writing
    ones), candidates scored by the reward with the row's ``answer``; rows without it refused before sampling. The
    sampler is replaced by fixed answers (one right, one wrong per prompt): no Ray, no vLLM."""
    from models.checkpoint import load_tokenizer
    from pipelines.prefs import pref_data
    from pipelines.tasks import ArithmeticConfig, run_arithmetic

    tok = load_tokenizer(tiny_checkpoint)
    run_arithmetic(ArithmeticConfig(out=str(tmp_path / "t"), n=6, heldout=2, seed=2))
    rows = [
        json.loads(x) for f in ("train", "heldout") for x in (tmp_path / "t" / f"{f}.jsonl").read_text().splitlines()
    ]
    calls = []

    def fake_sample(cfg, prompt_ids, stop_ids):
        calls.append(len(prompt_ids))
        by_prompt = {tuple(tok.encode(r["prompt"])): r["answer"] for r in rows}
        out = []
        for ids in prompt_ids:
            right = next((a for p, a in by_prompt.items() if tok.decode(ids).find(tok.decode(list(p))) >= 0), "0")
            out.append([tok.encode(right), tok.encode("no idea")])
        return out

    monkeypatch.setattr(pref_data, "_sample_remote", fake_sample)
    cfg = pref_data.PrefDataConfig(
        policy=str(tiny_checkpoint),
        prompts=str(tmp_path / "t"),
        out=str(tmp_path / "p"),
        reward="fn:exact_answer",
        samples=2,
        max_new_tokens=16,
    )
    res = pref_data.run(cfg)
    assert calls == [8] and res["counts"]["train_pairs"] == 6 and res["counts"]["val_pairs"] == 2  # heldout.jsonl
    assert res["policy_reward_pass_rate"] == 0.5
    pairs = [json.loads(x) for x in (tmp_path / "p" / "train.jsonl").read_text().splitlines()]
    answers = {r["prompt"]: r["answer"] for r in rows}
    for p in pairs:
        prompt = p["prompt"] if isinstance(p["prompt"], str) else p["prompt"][-1]["content"]
        assert p["chosen"] == answers[prompt] and p["rejected"] == "no idea" and p["source"] == "reward"
    bare = tmp_path / "bare.jsonl"
    bare.write_text(json.dumps({"prompt": "Compute 1+1."}) + "\n")
    with pytest.raises(RewardError, match="needs the column 'answer'"):
        pref_data.run(
            pref_data.PrefDataConfig(
                policy=str(tiny_checkpoint),
                prompts=str(bare),
                out=str(tmp_path / "q"),
                reward="fn:exact_answer",
                max_new_tokens=16,
            )
        )
    assert calls == [8]  # refused before sampling

"""The demo a user reads: the console keeps Ray's and vLLM's chatter in the log file and shows the user's lines
and progress bars; the closing summary reports each stage's numbers from its artifact, with the plots beside
summary.md, and tells the user how to serve and query the model."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_console_routes_chatter_to_the_log_and_results_to_the_terminal(tmp_path):
    """Run in a child process whose stdout is a pipe (the 'terminal'), so fds 1/2 can be redirected freely."""
    log_path = tmp_path / "demo.log"
    script = textwrap.dedent(f"""
        import logging, os, sys, threading, warnings
        from cluster.console import Console
        with Console({str(log_path)!r}) as con:
            logging.basicConfig(level=logging.INFO)
            logging.getLogger("lib").addHandler(logging._StderrHandler())  # its stream is a read-only property
            con.quiet_loggers()
            con.say("== step one")
            print("result", 42)
            logging.getLogger("ray.data").info("plan line")
            os.write(2, b"raylet C-level warning\\n")
            t = threading.Thread(target=lambda: print("(RayTrainWorker pid=7) worker chatter")); t.start(); t.join()
            t = threading.Thread(target=lambda: print("(RayTrainWorker pid=7) pretrain:  50%|#####     | 5/10 [00:01<00:01, 4.0it/s]"))
            t.start(); t.join()
            warnings.warn("noisy warning")
            print("after the bar")
        print("restored")
    """)
    r = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    term = r.stdout
    assert "== step one\nresult 42\n" in term and "restored" in term
    assert "pretrain:  50%|#####     | 5/10" in term and "pid=7" not in term, "the bar, without Ray's prefix"
    assert "after the bar" in term.split("5/10")[1], "a line after a bar starts on a new line"
    for chatter in ("plan line", "raylet C-level warning", "worker chatter", "noisy warning"):
        assert chatter not in term and chatter not in r.stderr
    log = log_path.read_text()
    for line in ("== step one", "result 42", "plan line", "raylet C-level warning", "worker chatter", "noisy warning"):
        assert line in log
    assert "5/10" not in log, "bar redraws stay out of the log"


def _write_manifest(path: Path, counts: dict, metrics: dict | None = None, config: dict | None = None) -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / "manifest.json").write_text(
        json.dumps(
            {
                "stage": path.name,
                "status": "finished",
                "counts": counts,
                "metrics": metrics or {},
                "config": config or {},
                "inputs": [],
            }
        )
    )


def _write_history(path: Path, rows: list[dict]) -> None:
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_summary_reports_each_stages_numbers_with_plots_and_how_to_serve(tmp_path):
    from cluster.demo import Outcome, steps
    from cluster.demo_summary import write_summary

    out = tmp_path / "demo"
    _write_manifest(
        out / "data",
        {
            "read": 100,
            "kept": 80,
            "dropped": {"code_long_lines": 7, "gopher_symbols": 3},
            "exact_duplicates": 4,
            "near_duplicates": 5,
            "malformed": {"empty": 1},
            "tokens": {"train": 9000, "val": 300},
            "n_vocab": 2048,
        },
        {"seconds": 12.5},
    )
    _write_manifest(
        out / "pretrain",
        {"steps": 900, "tokens": 1_843_200, "params": 2_345_678},
        {"loss": 2.51, "val_loss": 2.6789, "val_ppl": 14.57, "tokens_per_s": 2900.0},
    )
    # a noisy falling loss: 10 logged steps; the summary gives the mean +- sd of the first and last 3
    _write_history(
        out / "pretrain",
        [{"step": 10 * i, "loss": v} for i, v in enumerate([6.0, 5.0, 4.0, 3.2, 3.0, 2.9, 2.7, 2.5, 2.6, 2.4], 1)]
        + [{"step": 100, "val_loss": 2.6789}],
    )
    _write_manifest(
        out / "sft",
        {},
        {
            "heldout_answer_loss_before": 3.2,
            "heldout_answer_loss_after": 1.4,
            "parse_rate_before": 0.0,
            "parse_rate_after": 0.5625,
            "steps": 300,
        },
        {"eval": {"prompts": 16}},
    )
    _write_history(out / "sft", [{"step": s, "loss": 2.0 - s / 1000} for s in range(10, 310, 10)])
    (out / "serve").mkdir()
    (out / "serve" / "smoke.json").write_text(
        json.dumps(
            {
                "model": "sft",
                "answers": [
                    {
                        "question": "Write a Python function `def f(x)` that does the following: Return x.",
                        "answer": "def f(x):\n    return x",
                        "parses": True,
                        "sources": ["json/__init__.py"],
                    },
                    {
                        "question": "Implement `def g()` in Python. Do nothing.",
                        "answer": "g g g",
                        "parses": False,
                        "sources": [],
                    },
                ],
            }
        )
    )
    _write_manifest(
        out / "reward",
        {"val_pairs": 40},
        {
            "heldout_pairwise_accuracy_before": 0.5,
            "heldout_pairwise_accuracy": 0.875,
            "heldout_mean_margin": 1.25,
            "steps": 40,
        },
    )
    _write_manifest(
        out / "rlhf",
        {"iterations": 12},
        {"reward_mean_first": 0.41, "reward_mean_last": 0.77, "kl_last": 0.0123},
        {"reward": "rm:runs/demo/reward:0.1,fn:judge_pass"},
    )
    rewards = [0.41, 0.30, 0.52, 0.45, 0.50, 0.61, 0.55, 0.70, 0.58, 0.66, 0.77, 0.62]
    _write_history(
        out / "rlhf",
        [
            {"iteration": i, "reward_mean": r, "reward/judge_pass": r / 2, "kl": 0.001 * i, "sync_s": 0.3}
            for i, r in enumerate(rewards, 1)
        ],
    )
    (out / "eval.json").write_text(
        json.dumps(
            {
                "policies": [
                    {
                        "policy": str(out / "sft" / "model"),
                        "prompts": 48,
                        "decoding": "greedy",
                        "judge_pass_rate": 0.25,
                        "judge_mean": 0.5,
                        "rm_score_mean": -0.5,
                        "kl_to_reference": 0.0,
                        "answer_tokens_mean": 30.0,
                    },
                    {
                        "policy": str(out / "rlhf" / "model"),
                        "prompts": 48,
                        "decoding": "greedy",
                        "judge_pass_rate": 0.5,
                        "judge_mean": 0.75,
                        "rm_score_mean": 0.25,
                        "kl_to_reference": 0.031,
                        "answer_tokens_mean": 28.0,
                    },
                ]
            }
        )
    )
    outcomes = [Outcome("data", "ok", 12.0), Outcome("pretrain", "skipped", 0.0), Outcome("sft", "failed (1)", 3.0)]
    ov = ["from_scratch_alignment=true"]  # the from-scratch alignment sections too
    text = write_summary(out, steps(out, "demo", ov), outcomes, 15.0, "demo", f"{out}/rlhf")
    md = (out / "summary.md").read_text()
    assert text.startswith(md.rstrip("\n")) or md in text
    # data: every document accounted for, per rule and duplicates, and the accounting plot beside summary.md
    assert "| dropped by rule `code_long_lines` | 7 |" in md and "| near duplicates (MinHash LSH) | 5 |" in md
    assert "read 100 = kept + dropped + duplicates + malformed = 100" in md
    assert (out / "data_accounting.png").stat().st_size > 1000 and "](data_accounting.png)" in md
    # pretrain and sft numbers; status of every step
    assert "| validation loss (held-out blocks, last step) | 2.6789 |" in md
    assert "| validation perplexity | 14.6 |" in md
    # every curve with its spread: mean +- sd of the first and last points, never two single endpoints
    assert "| train loss (one step per point), first 3 points (steps 10-30), mean ± sd | 5.0000 ± 1.0000 |" in md
    assert "| train loss (one step per point), last 3 points (steps 80-100), mean ± sd | 2.5000 ± 0.1000 |" in md
    assert "| held-out answer loss, before SFT | 3.2000 |" in md
    assert "| held-out answer loss, after SFT | 1.4000 |" in md
    assert "| parse rate before SFT (answers that parse and define a function) | 0% (95% CI 0-19%, n=16) |" in md
    assert "| parse rate after SFT | 56% (95% CI 33-77%, n=16) |" in md
    assert "train answer loss (one step per point), first 5 points (steps 10-50)" in md
    assert "| sft | failed (1) | 3 |" in md and "| pretrain | skipped | 0 |" in md
    # serve: each answer, whether it parses, what retrieval found
    assert "answers that parse and define a function | 1 of 2 |" in md
    assert "parses as a function: yes; retrieval found: `json/__init__.py`" in md
    assert "parses as a function: no; retrieval found: nothing" in md
    # how to serve it and query it, with a real question and the served name
    assert f"genloop serve --config demo --model {out}/rlhf --knowledge {out}/serve" in md
    assert '"model": "sft"' in md and "def f(x)" in md.split("## Serve it yourself")[1]
    # alignment: reward model accuracy, reward curve ends, SFT vs RLHF side by side on held-out prompts
    assert "| held-out pairwise accuracy, untrained head | 50% (95% CI 35-65%, n=40) |" in md
    assert "| held-out pairwise accuracy, trained | 88% (95% CI 74-95%, n=40) |" in md
    assert (
        "| mean reward of an iteration's answers, first 4 points (iterations 1-4), mean ± sd | 0.4200 ± 0.0920 |" in md
    )
    assert (
        "| mean reward of an iteration's answers, last 4 points (iterations 9-12), mean ± sd | 0.6575 ± 0.0818 |" in md
    )
    assert "judge pass rate of an iteration's answers, last 4 points" in md
    assert "0.41 -> 0.77" not in md and "0.4100 -> 0.7700" not in md and "first -> last" not in md
    assert (
        "SFT vs RLHF on 48 held-out code-writing prompts (greedy)" in md
        and "| | sft | rlhf |\n| --- | ---: | ---: |" in md
    )
    assert (
        "| judge pass rate (requested function and signature) | 25% (95% CI 15-39%, n=48) | "
        "50% (95% CI 36-64%, n=48) |" in md
    )
    assert "| judge mean score | 0.500 ± 0.141 (95% CI at most, n=48) | 0.750 ± 0.122 (95% CI at most, n=48) |" in md
    assert (
        "| KL to the SFT model, per answer token | 0.0000 (n=48; spread not recorded) | "
        "0.0310 (n=48; spread not recorded) |" in md
    )
    assert "Judge pass rate, rlhf - sft: +25 points (95% CI +6 to +42): a difference." in md
    # a stage without an artifact is left out, not reported with made-up numbers
    assert "sft-data:" not in md and "## feedback" not in md


def test_summary_curl_example_is_valid_json_in_shell_quotes(tmp_path):
    import shlex

    from cluster.demo_summary import next_steps

    out = tmp_path / "d"
    (out / "serve").mkdir(parents=True)
    (out / "serve" / "smoke.json").write_text(
        json.dumps(
            {
                "model": "sft",
                "answers": [
                    {
                        "question": "Implement `def it's(x)` in Python. Don't \"fail\".",
                        "answer": "",
                        "parses": False,
                        "sources": [],
                    }
                ],
            }
        )
    )
    text = next_steps(out, "demo", f"{out}/sft")
    curl = text.split("curl ", 1)[1].split("\n```")[0].replace("\\\n", " ")
    argv = shlex.split("curl " + curl)
    body = json.loads(argv[argv.index("-d") + 1])
    assert body["messages"][0]["content"] == "Implement `def it's(x)` in Python. Don't \"fail\"."
    assert body["model"] == "sft"


def test_demo_steps_are_a_list_to_extend_and_serve_the_policy(tmp_path):
    """The 15-minute demo: the from-scratch chain, then the real model imported, GRPO'd, evaluated and served; the
    from-scratch alignment behind ``from_scratch_alignment=true``; without the real model the last from-scratch
    model is served."""
    from cluster.demo import demo_config, policy_dir, steps

    def names(*ov: str) -> list[str]:
        return [s.name for s in steps(tmp_path, "demo", ov)]

    chain, serving = ["data", "pretrain", "sft-data", "sft"], ["knowledge", "serve", "feedback", "lineage"]
    real, align = ["import", "tasks", "grpo", "eval-grpo"], ["pref-data", "reward", "rlhf", "eval"]
    assert names() == chain + real + serving
    assert names("from_scratch_alignment=true") == chain + align + real + serving
    assert names("real_model.enabled=false") == chain + serving
    for ov, served in [
        ((), "grpo"),
        (("real_model.enabled=false",), "sft"),
        (("real_model.enabled=false", "from_scratch_alignment=true"), "rlhf"),
    ]:
        policy = policy_dir(tmp_path, demo_config("demo", ov))
        assert policy == f"{tmp_path}/{served}", ov
        serve = next(s for s in steps(tmp_path, "demo", ov) if s.name == "serve").argv()
        assert serve[serve.index("--model") + 1] == policy
        lineage = next(s for s in steps(tmp_path, "demo", ov) if s.name == "lineage").argv()
        assert lineage[-1] == policy


def test_demo_real_model_steps_follow_the_demo_section(tmp_path):
    """import -> tasks -> GRPO (the real model's preset, the demo's iteration count and overrides) -> eval of the
    imported model vs the GRPO policy on every held-out problem."""
    from cluster.demo import steps
    from pipelines.config import ConfigError

    ov = ["real_model.iterations=3", "real_model.heldout=40", "real_model.rlhf=[train.lr=2e-5]"]
    by = {s.name: s for s in steps(tmp_path, "demo", ov)}
    assert by["import"].argv() == ["import-model", "smollm2-135m-instruct", "--out", f"{tmp_path}/real"]
    tasks = by["tasks"].argv()
    assert tasks[:2] == ["tasks", "arithmetic"] and tasks[tasks.index("--heldout") + 1] == "40"
    grpo = by["grpo"].argv()
    assert grpo[:3] == ["rlhf", "--config", "smollm2"] and grpo[grpo.index("--policy") + 1] == f"{tmp_path}/real"
    assert grpo[-2:] == ["iterations=3", "train.lr=2e-5"]
    ev = by["eval-grpo"].argv()
    assert ev.count("--policy") == 2 and ev[ev.index("--reference") + 1] == f"{tmp_path}/real"
    assert ev[ev.index("--n-prompts") + 1] == "40" and "fn:exact_answer" in ev[ev.index("--reward") + 1]
    with pytest.raises(ConfigError, match="iterations"):
        steps(tmp_path, "demo", ["real_model.iterations=0"])


def test_curve_ends_and_intervals():
    from cluster.demo_summary import curve_rows, rate_difference, wilson
    from pipelines.train.curves import curve_ends

    rows = [{"step": i, "loss": float(i % 2)} for i in range(1, 13)] + [{"step": 13, "val_loss": 1.0}]
    ends = curve_ends(rows, "loss")  # 12 points: the first and last 4, the val row ignored
    assert ends.k == 4 and ends.first_at == (1, 4) and ends.last_at == (9, 12)
    assert ends.first[0] == 0.5 and abs(ends.first[1] - 0.57735) < 1e-4
    assert curve_ends(rows[:1], "loss") is None and curve_ends(rows[:3], "loss").k == 1
    assert curve_rows(rows[:3], "loss", "loss") == [], "no spread from one point: no rows (the plot shows it)"
    last = ("loss, last 2 points (steps 4-5), mean ± sd", "0.5000 ± 0.7071")
    assert curve_rows(rows[:5], "loss", "loss")[1] == last
    lo, hi = wilson(0.0, 16)
    assert lo == 0.0 and 0.19 < hi < 0.20  # never below 0, unlike p +- 1.96 sqrt(p(1-p)/n)
    assert wilson(0.5, 0) == (0.0, 1.0)
    d, lo, hi = rate_difference(0.25, 48, 0.25, 48)
    assert d == 0.0 and lo < 0 < hi


def test_demo_runs_with_its_preset_only(tmp_path):
    """The rlhf step takes its reward, algorithm and group filter from the preset's rlhf: section; the eval step
    and the smoke test from its demo: section. Only the reward model's folder follows --out."""
    import yaml

    from cluster.demo import demo_reward, steps

    demo = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    assert demo["rlhf"]["reward"] == "rm:runs/demo/reward:0.1,fn:judge_pass,fn:signature_match:0.5"
    assert demo["rlhf"]["update"]["filter_groups"] == "judge_pass" and demo["rlhf"]["algo"] == "grpo"
    ov = ["from_scratch_alignment=true"]
    rlhf = next(s for s in steps(Path("runs/demo"), "demo", ov) if s.name == "rlhf").argv()
    assert "--reward" not in rlhf and not any("=" in a for a in rlhf) and "--algo" not in rlhf, rlhf
    rlhf = next(s for s in steps(tmp_path, "demo", ov) if s.name == "rlhf").argv()
    assert rlhf[rlhf.index("--reward") + 1] == f"rm:{tmp_path}/reward:0.1,fn:judge_pass,fn:signature_match:0.5"
    assert demo_reward("rm:a/b,fn:x:2", Path("o")) == "rm:o/reward,fn:x:2"
    ev = next(s for s in steps(tmp_path, "demo", ov) if s.name == "eval").argv()
    assert ev[ev.index("--n-prompts") + 1] == str(demo["demo"]["eval"]["n_prompts"])
    serve = next(s for s in steps(tmp_path, "demo") if s.name == "serve").argv()
    assert serve[serve.index("--smoke") + 1] == str(demo["demo"]["smoke_questions"])


def test_demo_without_a_demo_section_is_an_error(tmp_path):
    import pytest

    from cluster.demo import steps
    from pipelines.config import ConfigError

    f = tmp_path / "p.yaml"
    f.write_text("data:\n  seq_len: 64\n")
    with pytest.raises(ConfigError, match=r"has no 'demo:' section \(its sections: data:\).*presets with one: demo"):
        steps(tmp_path, str(f))


def test_summary_of_the_real_model_steps_gives_rates_intervals_and_the_gain(tmp_path):
    """tasks, grpo and eval-grpo in the summary: the held-out rates of the imported model and its GRPO policy, each
    with its Wilson interval, the difference with Newcombe's, and the verdict; the judge (no code asked) is absent."""
    from cluster.demo import steps
    from cluster.demo_summary import rate_difference, wilson, write_summary
    from pipelines.rlhf.evaluate import summarize_scores

    out = tmp_path / "demo"
    _write_manifest(out / "arith", {"train": 2000, "heldout": 128}, config={"digits": 2, "ops": "+"})
    (out / "arith" / "heldout.jsonl").write_text(json.dumps({"prompt": "Compute 1+2.", "answer": "3"}) + "\n")
    _write_manifest(out / "grpo", {"iterations": 8}, config={"reward": "fn:number_answer", "kl": {"coef": 0.0}})
    _write_history(out / "grpo", [{"iteration": i, "reward_mean": 0.1 * i, "kl": 0.0} for i in range(1, 9)])

    def policy(name: str, exact: int, number: int, kl: float) -> dict:
        return {
            "policy": f"{out}/{name}/model",
            "prompts": 128,
            "decoding": "greedy",
            "judge_pass_rate": None,
            "judge_mean": None,
            "answer_tokens_mean": 9.0,
            "kl_to_reference": kl,
            "rewards": {
                "exact_answer": summarize_scores([1.0] * exact + [0.0] * (128 - exact)),
                "number_answer": summarize_scores([1.0] * number + [0.0] * (128 - number)),
            },
            "answers": [{"prompt": "Compute 1+2.", "answer": "1 + 2 = 3", "reward": 1.0}],
        }

    rows = [policy("real", 0, 30, 0.0), policy("grpo", 2, 80, 0.3)]
    (out / "eval-grpo.json").write_text(json.dumps({"policies": rows}))
    write_summary(out, steps(out, "demo"), [], 1.0, "demo", f"{out}/grpo")
    md = (out / "summary.md").read_text()
    lo, hi = wilson(80 / 128, 128)
    assert "| right number (the last one in the answer) (`number_answer`) | 23% (95% CI" in md
    assert f"{100 * 80 / 128:.0f}% (95% CI {100 * lo:.0f}-{100 * hi:.0f}%, n=128)" in md
    d, dlo, dhi = rate_difference(30 / 128, 128, 80 / 128, 128)
    assert f"{100 * d:+.1f} points (95% CI {100 * dlo:+.1f} to {100 * dhi:+.1f}): a gain." in md
    assert "bare right answer: +1.6 points" in md and "no difference this evaluation can tell" in md
    assert "judge" not in md.split("imported vs GRPO")[1], "no code was asked: no judge rows"
    assert "| mean reward of an iteration's answers, first" in md and "KL to" not in md.split("## grpo")[1][:600]

"""The demo a user reads: the console keeps Ray's and vLLM's chatter in the log file and shows the user's lines
and progress bars; the closing summary reports each stage's numbers from its artifact, with the plots beside
summary.md, and tells the user how to serve and query the model."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

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
    for line in ("== step one", "result 42", "plan line", "raylet C-level warning", "worker chatter",
                 "noisy warning"):
        assert line in log
    assert "5/10" not in log, "bar redraws stay out of the log"


def _write_manifest(path: Path, counts: dict, metrics: dict | None = None) -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / "manifest.json").write_text(json.dumps({"stage": path.name, "status": "finished", "counts": counts,
                                                    "metrics": metrics or {}, "inputs": []}))


def test_summary_reports_each_stages_numbers_with_plots_and_how_to_serve(tmp_path):
    from cluster.demo import Outcome, steps
    from cluster.demo_summary import write_summary

    out = tmp_path / "demo"
    _write_manifest(out / "data", {"read": 100, "kept": 80, "dropped": {"code_long_lines": 7, "gopher_symbols": 3},
                                   "exact_duplicates": 4, "near_duplicates": 5, "malformed": {"empty": 1},
                                   "tokens": {"train": 9000, "val": 300}, "n_vocab": 2048},
                    {"seconds": 12.5})
    _write_manifest(out / "pretrain", {"steps": 900, "tokens": 1_843_200, "params": 2_345_678},
                    {"loss": 2.51, "val_loss": 2.6789, "val_ppl": 14.57, "tokens_per_s": 2900.0})
    _write_manifest(out / "sft", {}, {"heldout_answer_loss_before": 3.2, "heldout_answer_loss_after": 1.4,
                                      "parse_rate_before": 0.0, "parse_rate_after": 0.5625, "steps": 300})
    (out / "serve").mkdir()
    (out / "serve" / "smoke.json").write_text(json.dumps({"model": "sft", "answers": [
        {"question": "Write a Python function `def f(x)` that does the following: Return x.",
         "answer": "def f(x):\n    return x", "parses": True, "sources": ["json/__init__.py"]},
        {"question": "Implement `def g()` in Python. Do nothing.", "answer": "g g g", "parses": False,
         "sources": []}]}))
    _write_manifest(out / "reward", {}, {"heldout_pairwise_accuracy_before": 0.5, "heldout_pairwise_accuracy": 0.875,
                                         "heldout_mean_margin": 1.25, "steps": 40})
    _write_manifest(out / "rlhf", {"iterations": 12}, {"reward_first": 0.41, "reward_last": 0.77, "kl_last": 0.0123})
    (out / "eval.json").write_text(json.dumps({"policies": [
        {"policy": str(out / "sft" / "model"), "prompts": 48, "decoding": "greedy", "judge_pass_rate": 0.25,
         "judge_mean": 0.5, "rm_score_mean": -0.5, "kl_to_reference": 0.0, "answer_tokens_mean": 30.0},
        {"policy": str(out / "rlhf" / "model"), "prompts": 48, "decoding": "greedy", "judge_pass_rate": 0.5,
         "judge_mean": 0.75, "rm_score_mean": 0.25, "kl_to_reference": 0.031, "answer_tokens_mean": 28.0}]}))
    outcomes = [Outcome("data", "ok", 12.0), Outcome("pretrain", "skipped", 0.0), Outcome("sft", "failed (1)", 3.0)]
    text = write_summary(out, steps(out, "demo"), outcomes, 15.0, "demo")
    md = (out / "summary.md").read_text()
    assert text.startswith(md.rstrip("\n")) or md in text
    # data: every document accounted for, per rule and duplicates, and the accounting plot beside summary.md
    assert "| dropped by rule `code_long_lines` | 7 |" in md and "| near duplicates (MinHash LSH) | 5 |" in md
    assert "read 100 = kept + dropped + duplicates + malformed = 100" in md
    assert (out / "data_accounting.png").stat().st_size > 1000 and "](data_accounting.png)" in md
    # pretrain and sft numbers; status of every step
    assert "| validation loss | 2.6789 |" in md and "| validation perplexity | 14.6 |" in md
    assert "| held-out answer loss | 3.2000 -> 1.4000 |" in md and "0% -> 56%" in md
    assert "| sft | failed (1) | 3 |" in md and "| pretrain | skipped | 0 |" in md
    # serve: each answer, whether it parses, what retrieval found
    assert "answers that parse and define a function | 1 of 2 |" in md
    assert "parses as a function: yes; retrieval found: `json/__init__.py`" in md
    assert "parses as a function: no; retrieval found: nothing" in md
    # how to serve it and query it, with a real question and the served name
    assert f"genloop serve --config demo --model {out}/rlhf --knowledge {out}/serve" in md
    assert '"model": "sft"' in md and "def f(x)" in md.split("## Serve it yourself")[1]
    # alignment: reward model accuracy, reward curve ends, SFT vs RLHF side by side on held-out prompts
    assert "| held-out pairwise accuracy | 50% -> 88% |" in md
    assert "| mean reward, first -> last iteration | 0.4100 -> 0.7700 |" in md
    assert "SFT vs RLHF on 48 held-out code-writing prompts (greedy)" in md and "| | sft | rlhf |\n| --- | ---: | ---: |" in md
    assert "| judge pass rate (requested function and signature) | 25% | 50% |" in md
    assert "| KL to the SFT model, per answer token | 0.0000 | 0.0310 |" in md
    # a stage without an artifact is left out, not reported with made-up numbers
    assert "sft-data:" not in md and "## feedback" not in md


def test_summary_curl_example_is_valid_json_in_shell_quotes(tmp_path):
    import shlex

    from cluster.demo_summary import next_steps

    out = tmp_path / "d"
    (out / "serve").mkdir(parents=True)
    (out / "serve" / "smoke.json").write_text(json.dumps({"model": "sft", "answers": [
        {"question": "Implement `def it's(x)` in Python. Don't \"fail\".", "answer": "", "parses": False,
         "sources": []}]}))
    text = next_steps(out, "demo")
    curl = text.split("curl ", 1)[1].split("\n```")[0].replace("\\\n", " ")
    argv = shlex.split("curl " + curl)
    body = json.loads(argv[argv.index("-d") + 1])
    assert body["messages"][0]["content"] == "Implement `def it's(x)` in Python. Don't \"fail\"."
    assert body["model"] == "sft"


def test_demo_steps_are_a_list_to_extend_and_serve_the_policy(tmp_path):
    from cluster.demo import policy_dir, steps

    names = [s.name for s in steps(tmp_path, "demo")]
    assert names == ["data", "pretrain", "sft-data", "sft", "pref-data", "reward", "rlhf", "eval", "knowledge",
                     "serve", "feedback", "lineage"]
    assert policy_dir(tmp_path).endswith("/rlhf"), "the demo serves the RLHF policy"
    serve = next(s for s in steps(tmp_path, "demo") if s.name == "serve").argv()
    assert serve[serve.index("--model") + 1] == policy_dir(tmp_path)
    lineage = next(s for s in steps(tmp_path, "demo") if s.name == "lineage").argv()
    assert lineage[-1] == policy_dir(tmp_path)

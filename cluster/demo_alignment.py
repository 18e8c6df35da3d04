"""The demo summary's alignment sections: the from-scratch model's (pref-data -> reward -> rlhf -> eval) and the real
model's (tasks -> grpo -> eval-grpo). Same rules as ``cluster/demo_summary.py``: curves as the mean ± sd of their
first and last few points, held-out rates with their 95% Wilson intervals and differences with Newcombe's."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from cluster.demo_summary import (
    Section,
    _copy_plot,
    _history,
    _manifest,
    _mean_ci,
    _num,
    _pct,
    _pct_ci,
    _pm,
    curve_rows,
    rate_difference,
)
from pipelines.train.curves import curve_ends


def pref_data_section(out: Path, step: Any, served: str) -> Section | None:
    m = _manifest(out / "pref-data")
    if not m:
        return None
    c, x = m.get("counts", {}), m.get("metrics", {})
    return Section(
        "pref-data: the SFT model's own answers, judged into preference pairs",
        rows=[
            ("prompts x answers sampled", f"{c.get('prompts', 0):,} prompts, {c.get('samples', 0):,} answers"),
            ("SFT answers the judge passes", _pct(x.get("policy_judge_pass_rate"))),
            ("pairs (train / held-out)", f"{c.get('train_pairs', 0):,} / {c.get('val_pairs', 0):,}"),
        ],
    )


def reward_section(out: Path, step: Any, served: str) -> Section | None:
    m = _manifest(out / "reward")
    if not m:
        return None
    x, c = m.get("metrics", {}), m.get("counts", {})
    n = c.get("val_pairs")  # the held-out pairs both accuracies are measured on
    s = Section(
        "reward: a Bradley-Terry reward model (the SFT trunk + a scalar head)",
        rows=[
            ("held-out pairwise accuracy, untrained head", _pct_ci(x.get("heldout_pairwise_accuracy_before"), n)),
            ("held-out pairwise accuracy, trained", _pct_ci(x.get("heldout_pairwise_accuracy"), n)),
            ("held-out mean margin (chosen - rejected)", _num(x.get("heldout_mean_margin"))),
        ],
    )
    s.rows += curve_rows(_history(out / "reward"), "loss", "train loss (one step per point)")
    s.rows += [("steps", _num(x.get("steps"), "d")), ("train seconds", _num(x.get("train_seconds"), ".0f"))]
    return s


def rlhf_section(out: Path, step: Any, served: str) -> Section | None:
    return _rl_section(
        out / "rlhf", out, "rlhf: GRPO with vLLM rollout actors and a Ray Train learner", "the SFT model", "rlhf"
    )


def grpo_section(out: Path, step: Any, served: str) -> Section | None:
    m = _manifest(out / "real")
    cfg, counts = (m or {}).get("config", {}), (m or {}).get("counts", {})
    source = cfg.get("source") or "the imported model"
    if counts.get("params"):
        source += f" ({counts['params'] / 1e6:.0f}M parameters)"
    return _rl_section(
        out / "grpo",
        out,
        f"grpo: {source} aligned with GRPO on the train problems (vLLM rollouts, Ray Train learner)",
        "the imported model",
        "grpo",
    )


def _rl_section(path: Path, out: Path, title: str, start: str, plot_name: str) -> Section | None:
    m = _manifest(path)
    if not m:
        return None
    c = m.get("counts", {})
    cfg = m.get("config", {})
    reward = cfg.get("reward", "")
    rows = _history(path)
    s = Section(
        title, rows=[("reward", f"`{reward}`" if reward else "-"), ("iterations", _num(c.get("iterations"), "d"))]
    )
    s.rows += curve_rows(rows, "reward_mean", "mean reward of an iteration's answers", x="iteration")
    if any("reward/judge_pass" in r for r in rows):
        s.rows += curve_rows(rows, "reward/judge_pass", "judge pass rate of an iteration's answers", x="iteration")
    if (cfg.get("kl") or {}).get("coef", 1.0):  # at coef 0 no reference model runs: the logged KL is 0
        s.rows += curve_rows(rows, "kl", f"KL to {start}", x="iteration")
    times = curve_ends(rows, "t_iteration", "iteration")
    if times:
        s.rows.append(("seconds per iteration (last iterations, mean ± sd)", _pm(times.last, ".1f")))
    sync = curve_ends(rows, "sync_s", "iteration")
    s.rows.append(
        ("weight sync into the engines, seconds (last iterations, mean ± sd)", _pm(sync.last, ".2f") if sync else "-")
    )
    s.lines.append(
        "Each iteration's numbers are over its own sampled answers, so single iterations are noisy: the "
        f"rows give the mean ± standard deviation of the first and the last few; the held-out comparison "
        f"below (greedy, {start} vs after) is the measurement."
    )
    plot = _copy_plot(path / "reward_curve.png", out, f"{plot_name}_reward.png")
    if plot:
        s.plots.append((f"{plot_name} reward per iteration", plot))
    return s


def eval_section(out: Path, step: Any, served: str) -> Section | None:
    f = out / "eval.json"
    if not f.is_file():
        return None
    rows = json.loads(f.read_text()).get("policies", [])
    if not rows:
        return None
    s = Section(f"SFT vs RLHF on {rows[0]['prompts']} held-out code-writing prompts ({rows[0]['decoding']})")
    names = [
        Path(r["policy"]).parent.name if Path(r["policy"]).name == "model" else Path(r["policy"]).name for r in rows
    ]
    ns = [int(r["prompts"]) * int(r.get("samples_per_prompt") or 1) for r in rows]  # answers judged per policy
    table = [
        (
            "judge pass rate (requested function and signature)",
            [_pct_ci(r["judge_pass_rate"], n) for r, n in zip(rows, ns)],
        ),
        (
            "judge mean score",
            [_mean_ci(r["judge_mean"], r.get("judge_std"), n, bound01=True) for r, n in zip(rows, ns)],
        ),
        ("mean reward-model score", [_mean_ci(r["rm_score_mean"], r.get("rm_score_std"), n) for r, n in zip(rows, ns)]),
        (
            "KL to the SFT model, per answer token",
            [_mean_ci(r["kl_to_reference"], r.get("kl_std"), n, ".4f") for r, n in zip(rows, ns)],
        ),
    ]
    s.lines.append(
        "\n".join(
            [
                f"| | {' | '.join(names)} |",
                f"| --- |{' ---: |' * len(names)}",
                *(f"| {what} | {' | '.join(vals)} |" for what, vals in table),
            ]
        )
    )
    if len(rows) >= 2:
        d, lo, hi = rate_difference(rows[0]["judge_pass_rate"], ns[0], rows[-1]["judge_pass_rate"], ns[-1])
        verdict = "a difference" if lo > 0 or hi < 0 else "no difference this evaluation can tell from chance"
        s.lines.append(
            f"Judge pass rate, {names[-1]} - {names[0]}: {100 * d:+.0f} points (95% CI {100 * lo:+.0f} to "
            f"{100 * hi:+.0f}): {verdict}. Intervals: Wilson for rates, Newcombe for the difference; a "
            "score's interval is from its per-answer standard deviation where recorded."
        )
    return s


def tasks_section(out: Path, step: Any, served: str) -> Section | None:
    m = _manifest(out / "arith")
    if not m:
        return None
    c, cfg = m.get("counts", {}), m.get("config", {})
    first = (out / "arith" / "heldout.jsonl").read_text().splitlines()[:1]
    example = json.loads(first[0]) if first else {}
    s = Section(
        "tasks: generated problems with verifiable answers",
        rows=[
            ("problems (train / held-out, no problem in both)", f"{c.get('train', 0):,} / {c.get('heldout', 0):,}"),
            ("operands", f"{cfg.get('digits')} digits, operators {cfg.get('ops')}"),
        ],
    )
    if example:
        s.lines.append(f'A held-out problem: "{example.get("prompt", "")}" (answer {example.get("answer", "")})')
    return s


def eval_grpo_section(out: Path, step: Any, served: str) -> Section | None:
    """The imported model vs its GRPO policy on the held-out problems: every 0/1 reward part's rate with its Wilson
    interval, the difference with Newcombe's, the KL to the imported model."""
    f = out / "eval-grpo.json"
    if not f.is_file():
        return None
    rows = json.loads(f.read_text()).get("policies", [])
    if len(rows) < 2:
        return None
    names = ["imported", "after GRPO"] if len(rows) == 2 else [_policy_name(r["policy"]) for r in rows]
    n = int(rows[0]["prompts"])
    s = Section(f"imported vs GRPO on {n} held-out problems ({rows[0]['decoding']})")
    table: list[tuple[str, list[str]]] = []
    diffs: list[str] = []
    for part, first in (rows[0].get("rewards") or {}).items():
        cells = [r["rewards"][part] for r in rows]
        if part == "reward" or not all(c.get("binary") for c in cells):
            continue
        what = _PART_LABELS.get(part, part)
        table.append((f"{what} (`{part}`)", [_pct_ci(c["pass_rate"], c["answers"]) for c in cells]))
        d, lo, hi = rate_difference(first["pass_rate"], first["answers"], cells[-1]["pass_rate"], cells[-1]["answers"])
        verdict = "a gain" if lo > 0 else "a loss" if hi < 0 else "no difference this evaluation can tell from chance"
        diffs.append(f"{what}: {100 * d:+.1f} points (95% CI {100 * lo:+.1f} to {100 * hi:+.1f}): {verdict}.")
    table.append(
        (
            "KL to the imported model, per answer token",
            [_num(r.get("kl_to_reference"), ".4f") for r in rows],
        )
    )
    table.append(("answer tokens (mean)", [_num(r.get("answer_tokens_mean"), ".1f") for r in rows]))
    s.lines.append(
        "\n".join(
            [
                f"| | {' | '.join(names)} |",
                f"| --- |{' ---: |' * len(names)}",
                *(f"| {what} | {' | '.join(vals)} |" for what, vals in table),
            ]
        )
    )
    s.lines += diffs
    answers = list(zip(rows[0].get("answers") or [], rows[-1].get("answers") or []))[:3]
    if answers:
        s.lines.append(
            "\n".join(
                f'- "{a["prompt"]}": imported `{_oneline(a["answer"])}`, after GRPO `{_oneline(b["answer"])}`'
                for a, b in answers
            )
        )
    return s


_PART_LABELS = {"exact_answer": "bare right answer", "number_answer": "right number (the last one in the answer)"}


def _oneline(text: str, limit: int = 60) -> str:
    t = " ".join(text.split()).replace("`", "'")
    return t[:limit] + ("..." if len(t) > limit else "")


def _policy_name(path: str) -> str:
    p = Path(path)
    return p.parent.name if p.name == "model" else p.name


ALIGNMENT_SUMMARIES: dict[str, Callable[[Path, Any, str], Section | None]] = {
    "pref-data": pref_data_section,
    "reward": reward_section,
    "rlhf": rlhf_section,
    "eval": eval_section,
    "tasks": tasks_section,
    "grpo": grpo_section,
    "eval-grpo": eval_grpo_section,
}

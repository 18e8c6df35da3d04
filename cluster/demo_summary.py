"""The demo's closing summary: the numbers that matter per stage, read back from each step's artifact (so a resumed
demo reports skipped steps too), printed and written to ``<out>/summary.md`` with the plots beside it.

``SUMMARIES`` maps a demo step to a function ``(out, step) -> Section | None``; a new stage adds one here.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

log = logging.getLogger("genloop.demo")


def policy_dir(out: Path) -> str:
    """The model the demo serves: the last training stage's artifact (the RLHF policy)."""
    return f"{out}/rlhf"


@dataclass
class Section:
    title: str
    rows: list[tuple[str, str]] = field(default_factory=list)  # (what, value)
    lines: list[str] = field(default_factory=list)  # free text after the table (markdown)
    plots: list[tuple[str, str]] = field(default_factory=list)  # (caption, file name beside summary.md)


def _manifest(path: Path) -> dict[str, Any] | None:
    f = path / "manifest.json"
    return json.loads(f.read_text()) if f.is_file() else None


def _num(x: Any, fmt: str = ".4f") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return format(x, fmt) if isinstance(x, (int, float)) else str(x)


def _pct(x: Any) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def _copy_plot(src: Path, out: Path, name: str) -> str | None:
    if not src.is_file():
        return None
    shutil.copyfile(src, out / name)
    return name


# ---- per stage ----------------------------------------------------------------------------------------------------

def data_section(out: Path, step: Any) -> Section | None:
    m = _manifest(out / "data")
    if not m:
        return None
    c = m["counts"]
    dups = c.get("exact_duplicates", 0) + c.get("near_duplicates", 0)
    s = Section("data: clean, deduplicate, tokenize")
    s.rows = [("documents read", f"{c['read']:,}"), ("kept", f"{c['kept']:,}")]
    s.rows += [(f"dropped by rule `{k}`", f"{v:,}") for k, v in sorted(c.get("dropped", {}).items(), key=lambda kv: -kv[1])]
    s.rows += [("exact duplicates", f"{c.get('exact_duplicates', 0):,}"),
               ("near duplicates (MinHash LSH)", f"{c.get('near_duplicates', 0):,}")]
    s.rows += [(f"malformed: {k}", f"{v:,}") for k, v in c.get("malformed", {}).items()]
    tok = c.get("tokens", {})
    s.rows += [("tokens train / val", f"{tok.get('train', 0):,} / {tok.get('val', 0):,}"),
               ("vocabulary", f"{c.get('n_vocab', '-')}"),
               ("seconds", _num(m.get("metrics", {}).get("seconds"), ".0f"))]
    accounted = c["kept"] + sum(c.get("dropped", {}).values()) + dups + sum(c.get("malformed", {}).values())
    s.lines.append(f"Every document is accounted for: read {c['read']:,} = kept + dropped + duplicates + malformed "
                   f"= {accounted:,}.")
    plot = _accounting_plot(c, out / "data_accounting.png")
    if plot:
        s.plots.append(("what happened to the documents read", plot))
    return s


def _accounting_plot(c: dict[str, Any], path: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    # (label, count, colour): kept, then each drop rule, the duplicates, the malformed inputs
    items = [("kept", c["kept"], "tab:green")]
    items += [(f"dropped: {k}", v, "tab:orange") for k, v in sorted(c.get("dropped", {}).items(), key=lambda kv: -kv[1])]
    items += [("exact duplicates", c.get("exact_duplicates", 0), "tab:purple"),
              ("near duplicates", c.get("near_duplicates", 0), "tab:purple")]
    items += [(f"malformed: {k}", v, "tab:red") for k, v in c.get("malformed", {}).items()]
    items = [it for it in items if it[1]][::-1]  # top to bottom as listed
    fig, ax = plt.subplots(figsize=(7.5, 0.32 * len(items) + 1.3))
    ax.barh([k for k, _, _ in items], [v for _, v, _ in items], color=[col for _, _, col in items])
    ax.set_xscale("log")  # kept dwarfs every rule otherwise
    for y, (_, v, _) in enumerate(items):
        ax.text(v * 1.1, y, f"{v:,}", va="center", fontsize=8)
    ax.set_xlim(right=max(v for _, v, _ in items) * 8)
    ax.set_xlabel("documents (log scale)")
    whole = sum(v for _, v, _ in items) == c["read"]
    ax.set_title(f"data: {c['read']:,} documents read" + (", every one accounted for" if whole else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path.name


def pretrain_section(out: Path, step: Any) -> Section | None:
    m = _manifest(out / "pretrain")
    if not m:
        return None
    c, x = m.get("counts", {}), m.get("metrics", {})
    s = Section("pretrain: the transformer on the tokens (Ray Train)")
    s.rows = [("parameters", f"{c.get('params', 0) / 1e6:.2f} M"), ("steps", f"{c.get('steps', 0):,}"),
              ("tokens seen", f"{c.get('tokens', 0):,}"), ("final train loss", _num(x.get("loss"))),
              ("validation loss", _num(x.get("val_loss"))), ("validation perplexity", _num(x.get("val_ppl"), ".1f")),
              ("tokens / s", _num(x.get("tokens_per_s"), ".0f"))]
    plot = _copy_plot(out / "pretrain" / "loss_curve.png", out, "pretrain_loss.png")
    if plot:
        s.plots.append(("pretraining loss (train and validation)", plot))
    return s


def sft_data_section(out: Path, step: Any) -> Section | None:
    m = _manifest(out / "sft-data")
    if not m:
        return None
    c = m.get("counts", {})
    s = Section("sft-data: an instruction set from the stdlib's documented functions")
    s.rows = [("functions read", f"{c.get('functions', 0):,}"), ("train examples", f"{c.get('train', 0):,}"),
              ("held-out examples", f"{c.get('val', 0):,}"),
              ("tasks", ", ".join(f"{k[5:]} {v:,}" for k, v in c.items() if k.startswith("task_")))]
    return s


def sft_section(out: Path, step: Any) -> Section | None:
    m = _manifest(out / "sft")
    if not m:
        return None
    x = m.get("metrics", {})
    s = Section("sft: instruction fine-tuning (loss on answers only)")
    s.rows = [("held-out answer loss", f"{_num(x.get('heldout_answer_loss_before'))} -> "
                                       f"{_num(x.get('heldout_answer_loss_after'))}"),
              ("parse rate (answers that parse and define a function)",
               f"{_pct(x.get('parse_rate_before'))} -> {_pct(x.get('parse_rate_after'))}"),
              ("steps", _num(x.get("steps"), "d")), ("train seconds", _num(x.get("train_seconds"), ".0f"))]
    s.lines.append("Before -> after, on held-out functions the model never saw. Samples: `sft/samples.jsonl`.")
    plot = _copy_plot(out / "sft" / "loss_curve.png", out, "sft_loss.png")
    if plot:
        s.plots.append(("SFT loss on answer tokens", plot))
    return s


def knowledge_section(out: Path, step: Any) -> Section | None:
    db = out / "serve" / "knowledge.db"
    if not db.is_file():
        return None
    from serve.knowledge import KnowledgeStore

    return Section("knowledge: the store retrieval reads", rows=[("documents", f"{KnowledgeStore(db).count():,}")])


def serve_section(out: Path, step: Any) -> Section | None:
    f = out / "serve" / "smoke.json"
    if not f.is_file():
        return None
    smoke = json.loads(f.read_text())
    answers = smoke.get("answers", [])
    ok = sum(a["parses"] for a in answers)
    s = Section(f"serve: {smoke.get('model')} over OpenAI-compatible HTTP, with retrieval",
                rows=[("held-out code-writing requests answered", str(len(answers))),
                      ("answers that parse and define a function", f"{ok} of {len(answers)}")])
    for i, a in enumerate(answers, 1):
        q = " ".join(a["question"].split())
        s.lines.append(f"{i}. **{q[:160]}{'...' if len(q) > 160 else ''}**  \n"
                       f"   parses as a function: {'yes' if a['parses'] else 'no'}; retrieval found: "
                       f"{', '.join(f'`{x}`' for x in a['sources']) or 'nothing'}\n\n"
                       f"   ```\n{_indent(_shown(a['answer']), '   ')}\n   ```")
    return s


def _shown(answer: str, limit: int = 400) -> str:
    """An answer as a code block shows it: cut at ``limit`` characters; empty or blank answers say so."""
    if not answer:
        return "(empty answer)"
    if not answer.strip():
        return f"({len(answer)} whitespace characters)"
    return answer.strip("\n")[:limit] + (" ..." if len(answer.strip("\n")) > limit else "")


def _indent(text: str, pad: str) -> str:
    return "\n".join(pad + ln for ln in text.splitlines())


def feedback_section(out: Path, step: Any) -> Section | None:
    rnd = out / "serve" / "round1"
    prefs, ratings = rnd / "prefs.jsonl", rnd / "prefs.ratings.jsonl"
    if not prefs.is_file():
        return None
    rows = lambda p: [json.loads(ln) for ln in p.read_text().splitlines() if ln.strip()] if p.is_file() else []  # noqa: E731
    pairs, rated = rows(prefs), rows(ratings)
    versions = sorted({str(r.get("model_version")) for r in [*pairs, *rated]})
    ups = sum(1 for r in rated if (r.get("score") or 0) > 0)  # score in [-1, 1]: up / 4-5 stars above 0
    s = Section("feedback: one continuous-learning round (rated while serving, exported by model version)", rows=[
        ("model version served and rated", ", ".join(versions) or "-"),
        ("ratings (up / down)", f"{len(rated)} ({ups} / {len(rated) - ups})"),
        ("preference pairs", str(len(pairs))),
        ("exported to", f"`{prefs}`")])
    s.lines.append(f"The next round's reward stage reads them: `genloop reward --init-from {out}/rlhf --data {prefs} "
                   f"--out {out}/reward2`.")
    return s


def lineage_section(out: Path, step: Any) -> Section | None:
    from pipelines.artifacts import lineage

    try:
        chain = list(lineage(policy_dir(out)))
    except (ValueError, FileNotFoundError):
        return None
    s = Section("lineage: the served model back to the raw corpus")
    s.lines.append("```\n" + "\n".join(f"{'  ' * d}{e['stage']}: {e['path']}" for d, e in chain) + "\n```")
    return s


def pref_data_section(out: Path, step: Any) -> Section | None:
    m = _manifest(out / "pref-data")
    if not m:
        return None
    c, x = m.get("counts", {}), m.get("metrics", {})
    return Section("pref-data: the SFT model's own answers, judged into preference pairs", rows=[
        ("prompts x answers sampled", f"{c.get('prompts', 0):,} prompts, {c.get('samples', 0):,} answers"),
        ("SFT answers the judge passes", _pct(x.get("policy_judge_pass_rate"))),
        ("pairs (train / held-out)", f"{c.get('train_pairs', 0):,} / {c.get('val_pairs', 0):,}")])


def reward_section(out: Path, step: Any) -> Section | None:
    m = _manifest(out / "reward")
    if not m:
        return None
    x = m.get("metrics", {})
    return Section("reward: a Bradley-Terry reward model (the SFT trunk + a scalar head)", rows=[
        ("held-out pairwise accuracy", f"{_pct(x.get('heldout_pairwise_accuracy_before'))} -> "
                                       f"{_pct(x.get('heldout_pairwise_accuracy'))}"),
        ("held-out mean margin (chosen - rejected)", _num(x.get("heldout_mean_margin"))),
        ("steps", _num(x.get("steps"), "d")), ("train seconds", _num(x.get("train_seconds"), ".0f"))])


def rlhf_section(out: Path, step: Any) -> Section | None:
    m = _manifest(out / "rlhf")
    if not m:
        return None
    x, c = m.get("metrics", {}), m.get("counts", {})
    reward = m.get("config", {}).get("reward", "")
    s = Section("rlhf: GRPO with vLLM rollout actors and a Ray Train learner", rows=[
        ("reward", f"`{reward}`" if reward else "-"),
        ("iterations", _num(c.get("iterations"), "d")),
        ("mean reward, first -> last iteration", f"{_num(x.get('reward_first'))} -> {_num(x.get('reward_last'))}"),
        ("KL to the SFT model (last iteration)", _num(x.get("kl_last"))),
        ("weight sync into the engines, seconds", _num(x.get("sync_s_last"), ".2f"))])
    plot = _copy_plot(out / "rlhf" / "reward_curve.png", out, "rlhf_reward.png")
    if plot:
        s.plots.append(("RLHF reward per iteration", plot))
    return s


def eval_section(out: Path, step: Any) -> Section | None:
    f = out / "eval.json"
    if not f.is_file():
        return None
    rows = json.loads(f.read_text()).get("policies", [])
    if not rows:
        return None
    s = Section(f"SFT vs RLHF on {rows[0]['prompts']} held-out code-writing prompts ({rows[0]['decoding']})")
    names = [Path(r["policy"]).parent.name if Path(r["policy"]).name == "model" else Path(r["policy"]).name
             for r in rows]
    table = [("judge pass rate (requested function and signature)", [_pct(r["judge_pass_rate"]) for r in rows]),
             ("judge mean score", [_num(r["judge_mean"], ".3f") for r in rows]),
             ("mean reward-model score", [_num(r["rm_score_mean"], ".3f") for r in rows]),
             ("KL to the SFT model, per answer token", [_num(r["kl_to_reference"]) for r in rows])]
    s.lines.append("\n".join([f"| | {' | '.join(names)} |", f"| --- |{' ---: |' * len(names)}",
                               *(f"| {what} | {' | '.join(vals)} |" for what, vals in table)]))
    return s


SUMMARIES: dict[str, Callable[[Path, Any], Section | None]] = {
    "data": data_section, "pretrain": pretrain_section, "sft-data": sft_data_section, "sft": sft_section,
    "pref-data": pref_data_section, "reward": reward_section, "rlhf": rlhf_section, "eval": eval_section,
    "knowledge": knowledge_section, "serve": serve_section, "feedback": feedback_section,
    "lineage": lineage_section,
}


# ---- the page -------------------------------------------------------------------------------------------------------

def render(sections: Sequence[Section], outcomes: Sequence[Any], total_s: float, preset: str) -> str:
    md = [f"# genloop demo ({preset} preset)", "", "| step | status | seconds |", "| --- | --- | ---: |"]
    md += [f"| {o.name} | {o.status} | {o.seconds:.0f} |" for o in outcomes]
    md += [f"| total | | {total_s:.0f} |", ""]
    for s in sections:
        md += [f"## {s.title}", ""]
        if s.rows:
            md += ["| | |", "| --- | ---: |"] + [f"| {k} | {v} |" for k, v in s.rows] + [""]
        md += [*s.lines, ""] if s.lines else []
        md += [f"![{cap}]({name})" for cap, name in s.plots] + ([""] if s.plots else [])
    return "\n".join(md)


def next_steps(out: Path, preset: str) -> str:
    smoke = out / "serve" / "smoke.json"
    q = "Write a Python function `def is_even(n)` that does the following: Return True if n is even."
    name = Path(policy_dir(out)).name
    if smoke.is_file():
        data = json.loads(smoke.read_text())
        name = data.get("model", name)
        q = next((a["question"] for a in data.get("answers", [])), q)
    body = json.dumps({"model": name, "messages": [{"role": "user", "content": q}], "max_tokens": 64})
    return "\n".join([
        "## Serve it yourself", "",
        "```bash",
        ". .venv/bin/activate",
        f"genloop serve --config {preset} --model {policy_dir(out)} --knowledge {out}/serve   # Ctrl-C stops",
        "# in another terminal:",
        "curl -s http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\",
        f"  -d '{body.replace(chr(39), chr(39) + chr(92) + chr(39) + chr(39))}'",
        "```", "",
        "Any OpenAI client works too (`base_url=\"http://127.0.0.1:8000/v1\"`); `genloop serve --help` lists the "
        "options.",
    ])


def write_summary(out: Path, steps: Sequence[Any], outcomes: Sequence[Any], total_s: float, preset: str) -> str:
    """Build every section whose artifact exists, write ``out/summary.md`` (plots beside it); returns the text."""
    sections = []
    for step in steps:
        fn = SUMMARIES.get(step.summary or step.name)
        if fn is None:
            continue
        try:
            sec = fn(out, step)
        except Exception:  # a summary must never hide the demo's outcome
            log.exception("summary of %s failed", step.name)
            continue
        if sec is not None:
            sections.append(sec)
    text = render(sections, outcomes, total_s, preset) + "\n" + next_steps(out, preset) + "\n"
    (out / "summary.md").write_text(text)
    return text + f"\n(written to {out}/summary.md, plots beside it)"

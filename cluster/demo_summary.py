"""The demo's closing summary: the numbers that matter per stage, read back from each step's artifact (so a resumed
demo reports skipped steps too), printed and written to ``<out>/summary.md`` with the plots beside it.

``SUMMARIES`` maps a demo step to a function ``(out, step, served) -> Section | None`` (``served``: the folder of the
model the demo serves); a new stage adds one here.

A curve is never reported as its two endpoints (one noisy iteration each): a training curve as the mean and standard
deviation of its first and of its last few logged points (``curve_ends``), a held-out evaluation's rate with its 95%
Wilson interval (``wilson``) over the number of answers or pairs it was measured on.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from pipelines.train.curves import curve_ends

log = logging.getLogger("genloop.demo")


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


def _history(path: Path) -> list[dict[str, Any]]:
    """A stage's ``metrics.jsonl`` rows (one per logged step or iteration); [] when there is none."""
    f = path / "metrics.jsonl"
    if not f.is_file():
        return []
    return [json.loads(ln) for ln in f.read_text().splitlines() if ln.strip()]


def curve_rows(
    rows: Sequence[dict[str, Any]], key: str, what: str, x: str = "step", fmt: str = ".4f"
) -> list[tuple[str, str]]:
    """Two summary rows for a curve: ``what`` over its first and its last k points, mean +- standard deviation; none
    for a curve of fewer than four points (no spread to give: its plot shows it)."""
    ends = curve_ends(rows, key, x)
    if ends is None or ends.k < 2:
        return []
    pts = f"{ends.k} points"

    def span(at: tuple[Any, Any]) -> str:
        return f"{x}s {at[0]}-{at[1]}"

    return [
        (f"{what}, first {pts} ({span(ends.first_at)}), mean ± sd", _pm(ends.first, fmt)),
        (f"{what}, last {pts} ({span(ends.last_at)}), mean ± sd", _pm(ends.last, fmt)),
    ]


def _pm(ms: tuple[float, float], fmt: str) -> str:
    return f"{format(ms[0], fmt)} ± {format(ms[1], fmt)}"


def wilson(rate: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """The 95% Wilson score interval of a proportion ``rate`` measured on ``n`` trials (sound near 0 and 1, where the
    normal approximation gives intervals below 0)."""
    if n <= 0:
        return 0.0, 1.0
    d = 1 + z * z / n
    centre = (rate + z * z / (2 * n)) / d
    half = z * math.sqrt(rate * (1 - rate) / n + z * z / (4 * n * n)) / d
    return max(0.0, centre - half), min(1.0, centre + half)


def _pct_ci(rate: Any, n: Any) -> str:
    """``25% (95% CI 14-40%, n=48)``; the rate alone when ``n`` is unknown."""
    if rate is None:
        return "-"
    if not isinstance(n, int) or n <= 0:
        return _pct(rate)
    lo, hi = wilson(float(rate), n)
    return f"{100 * rate:.0f}% (95% CI {100 * lo:.0f}-{100 * hi:.0f}%, n={n})"


def rate_difference(p1: float, n1: int, p2: float, n2: int) -> tuple[float, float, float]:
    """``p2 - p1`` with its 95% interval (Newcombe's hybrid score method from the two Wilson intervals; it treats
    the samples as independent, which is conservative for two policies answering the same prompts)."""
    l1, u1 = wilson(p1, n1)
    l2, u2 = wilson(p2, n2)
    d = p2 - p1
    return d, d - math.sqrt((p2 - l2) ** 2 + (u1 - p1) ** 2), d + math.sqrt((u2 - p2) ** 2 + (p1 - l1) ** 2)


def _mean_ci(mean: Any, sd: Any, n: Any, fmt: str = ".3f", bound01: bool = False) -> str:
    """``0.512 +- 0.034 (95% CI, n=96)`` from a mean, its per-answer standard deviation and the number of answers.
    ``bound01``: the values lie in [0, 1], so without a recorded sd the largest one possible, sqrt(m (1 - m))
    (Bhatia-Davis), gives a conservative interval."""
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "-"
    if not isinstance(n, int) or n <= 1:
        return _num(mean, fmt)
    if not isinstance(sd, (int, float)):
        if not bound01:
            return f"{format(mean, fmt)} (n={n}; spread not recorded)"
        sd = math.sqrt(max(0.0, mean * (1 - mean)))
        return f"{format(mean, fmt)} ± {format(1.96 * sd / math.sqrt(n), fmt)} (95% CI at most, n={n})"
    return f"{format(mean, fmt)} ± {format(1.96 * sd / math.sqrt(n), fmt)} (95% CI, n={n})"


def _copy_plot(src: Path, out: Path, name: str) -> str | None:
    if not src.is_file():
        return None
    shutil.copyfile(src, out / name)
    return name


# ---- per stage ----------------------------------------------------------------------------------------------------


def data_section(out: Path, step: Any, served: str) -> Section | None:
    m = _manifest(out / "data")
    if not m:
        return None
    c = m["counts"]
    dups = c.get("exact_duplicates", 0) + c.get("near_duplicates", 0)
    s = Section("data: clean, deduplicate, tokenize")
    s.rows = [("documents read", f"{c['read']:,}"), ("kept", f"{c['kept']:,}")]
    s.rows += [
        (f"dropped by rule `{k}`", f"{v:,}") for k, v in sorted(c.get("dropped", {}).items(), key=lambda kv: -kv[1])
    ]
    s.rows += [
        ("exact duplicates", f"{c.get('exact_duplicates', 0):,}"),
        ("near duplicates (MinHash LSH)", f"{c.get('near_duplicates', 0):,}"),
    ]
    s.rows += [(f"malformed: {k}", f"{v:,}") for k, v in c.get("malformed", {}).items()]
    tok = c.get("tokens", {})
    s.rows += [
        ("tokens train / val", f"{tok.get('train', 0):,} / {tok.get('val', 0):,}"),
        ("vocabulary", f"{c.get('n_vocab', '-')}"),
        ("seconds", _num(m.get("metrics", {}).get("seconds"), ".0f")),
    ]
    accounted = c["kept"] + sum(c.get("dropped", {}).values()) + dups + sum(c.get("malformed", {}).values())
    s.lines.append(
        f"Every document is accounted for: read {c['read']:,} = kept + dropped + duplicates + malformed "
        f"= {accounted:,}."
    )
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
    items += [
        (f"dropped: {k}", v, "tab:orange") for k, v in sorted(c.get("dropped", {}).items(), key=lambda kv: -kv[1])
    ]
    items += [
        ("exact duplicates", c.get("exact_duplicates", 0), "tab:purple"),
        ("near duplicates", c.get("near_duplicates", 0), "tab:purple"),
    ]
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


def pretrain_section(out: Path, step: Any, served: str) -> Section | None:
    m = _manifest(out / "pretrain")
    if not m:
        return None
    c, x = m.get("counts", {}), m.get("metrics", {})
    s = Section("pretrain: the transformer on the tokens (Ray Train)")
    s.rows = [
        ("parameters", f"{c.get('params', 0) / 1e6:.2f} M"),
        ("steps", f"{c.get('steps', 0):,}"),
        ("tokens seen", f"{c.get('tokens', 0):,}"),
    ]
    s.rows += curve_rows(_history(out / "pretrain"), "loss", "train loss (one step per point)")
    s.rows += [
        ("validation loss (held-out blocks, last step)", _num(x.get("val_loss"))),
        ("validation perplexity", _num(x.get("val_ppl"), ".1f")),
        ("tokens / s", _num(x.get("tokens_per_s"), ".0f")),
    ]
    plot = _copy_plot(out / "pretrain" / "loss_curve.png", out, "pretrain_loss.png")
    if plot:
        s.plots.append(("pretraining loss (train and validation)", plot))
    return s


def sft_data_section(out: Path, step: Any, served: str) -> Section | None:
    m = _manifest(out / "sft-data")
    if not m:
        return None
    c = m.get("counts", {})
    s = Section("sft-data: an instruction set from the stdlib's documented functions")
    s.rows = [
        ("functions read", f"{c.get('functions', 0):,}"),
        ("train examples", f"{c.get('train', 0):,}"),
        ("held-out examples", f"{c.get('val', 0):,}"),
        ("tasks", ", ".join(f"{k[5:]} {v:,}" for k, v in c.items() if k.startswith("task_"))),
    ]
    return s


def sft_section(out: Path, step: Any, served: str) -> Section | None:
    m = _manifest(out / "sft")
    if not m:
        return None
    x = m.get("metrics", {})
    n = m.get("config", {}).get("eval", {}).get("prompts")  # the held-out prompts answered before and after
    s = Section("sft: instruction fine-tuning (loss on answers only)")
    s.rows = [
        ("held-out answer loss, before SFT", _num(x.get("heldout_answer_loss_before"))),
        ("held-out answer loss, after SFT", _num(x.get("heldout_answer_loss_after"))),
        ("parse rate before SFT (answers that parse and define a function)", _pct_ci(x.get("parse_rate_before"), n)),
        ("parse rate after SFT", _pct_ci(x.get("parse_rate_after"), n)),
    ]
    s.rows += curve_rows(_history(out / "sft"), "loss", "train answer loss (one step per point)")
    s.rows += [("steps", _num(x.get("steps"), "d")), ("train seconds", _num(x.get("train_seconds"), ".0f"))]
    s.lines.append(
        "Before and after, on the same held-out functions the model never saw (the loss on the same "
        "held-out rows; the parse rate with its 95% interval over the greedy answers). Samples: "
        "`sft/samples.jsonl`."
    )
    plot = _copy_plot(out / "sft" / "loss_curve.png", out, "sft_loss.png")
    if plot:
        s.plots.append(("SFT loss on answer tokens", plot))
    return s


def knowledge_section(out: Path, step: Any, served: str) -> Section | None:
    db = out / "serve" / "knowledge.db"
    if not db.is_file():
        return None
    from serve.knowledge import KnowledgeStore

    return Section("knowledge: the store retrieval reads", rows=[("documents", f"{KnowledgeStore(db).count():,}")])


def serve_section(out: Path, step: Any, served: str) -> Section | None:
    f = out / "serve" / "smoke.json"
    if not f.is_file():
        return None
    smoke = json.loads(f.read_text())
    answers = smoke.get("answers", [])
    ok = sum(a["parses"] for a in answers)
    s = Section(
        f"serve: {smoke.get('model')} over OpenAI-compatible HTTP, with retrieval",
        rows=[
            ("held-out code-writing requests answered", str(len(answers))),
            ("answers that parse and define a function", f"{ok} of {len(answers)}"),
        ],
    )
    for i, a in enumerate(answers, 1):
        q = " ".join(a["question"].split())
        s.lines.append(
            f"{i}. **{q[:160]}{'...' if len(q) > 160 else ''}**  \n"
            f"   parses as a function: {'yes' if a['parses'] else 'no'}; retrieval found: "
            f"{', '.join(f'`{x}`' for x in a['sources']) or 'nothing'}\n\n"
            f"   ```\n{_indent(_shown(a['answer']), '   ')}\n   ```"
        )
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


def feedback_section(out: Path, step: Any, served: str) -> Section | None:
    rnd = out / "serve" / "round1"
    prefs, ratings = rnd / "prefs.jsonl", rnd / "prefs.ratings.jsonl"
    if not prefs.is_file():
        return None
    rows = lambda p: [json.loads(ln) for ln in p.read_text().splitlines() if ln.strip()] if p.is_file() else []  # noqa: E731
    pairs, rated = rows(prefs), rows(ratings)
    versions = sorted({str(r.get("model_version")) for r in [*pairs, *rated]})
    ups = sum(1 for r in rated if (r.get("score") or 0) > 0)  # score in [-1, 1]: up / 4-5 stars above 0
    s = Section(
        "feedback: one continuous-learning round (rated while serving, exported by model version)",
        rows=[
            ("model version served and rated", ", ".join(versions) or "-"),
            ("ratings (up / down)", f"{len(rated)} ({ups} / {len(rated) - ups})"),
            ("preference pairs", str(len(pairs))),
            ("exported to", f"`{prefs}`"),
        ],
    )
    s.lines.append(
        f"The next round's reward stage reads them: `genloop reward --init-from {served} --data {prefs} "
        f"--out {out}/reward2`."
    )
    return s


def lineage_section(out: Path, step: Any, served: str) -> Section | None:
    from pipelines.artifacts import lineage

    try:
        chain = list(lineage(served))
    except (ValueError, FileNotFoundError):
        return None
    s = Section("lineage: the served model back to the raw corpus")
    s.lines.append("```\n" + "\n".join(f"{'  ' * d}{e['stage']}: {e['path']}" for d, e in chain) + "\n```")
    return s


SUMMARIES: dict[str, Callable[[Path, Any, str], Section | None]] = {
    "data": data_section,
    "pretrain": pretrain_section,
    "sft-data": sft_data_section,
    "sft": sft_section,
    "knowledge": knowledge_section,
    "serve": serve_section,
    "feedback": feedback_section,
    "lineage": lineage_section,
}  # plus the alignment steps' (cluster/demo_alignment.py), added where the summary is written


# ---- the page -------------------------------------------------------------------------------------------------------


def render(sections: Sequence[Section], outcomes: Sequence[Any], total_s: float, preset: str) -> str:
    md = [f"# genloop demo ({preset} preset)", "", "| step | status | seconds |", "| --- | --- | ---: |"]
    md += [f"| {o.name} | {o.status} | {o.seconds:.0f} |" for o in outcomes]
    md += [f"| total | | {total_s:.0f} |", ""]
    for s in sections:
        md += [f"## {s.title}", ""]
        if s.rows:
            md += ["| | |", "| --- | ---: |"] + [f"| {k} | {v} |" for k, v in s.rows] + [""]
        for line in s.lines:  # paragraphs and tables: a blank line after each (a table ends there)
            md += [line, ""]
        md += [f"![{cap}]({name})" for cap, name in s.plots] + ([""] if s.plots else [])
    return "\n".join(md)


def next_steps(out: Path, preset: str, served: str) -> str:
    smoke = out / "serve" / "smoke.json"
    q = "Write a Python function `def is_even(n)` that does the following: Return True if n is even."
    name = Path(served).name
    if smoke.is_file():
        data = json.loads(smoke.read_text())
        name = data.get("model", name)
        q = next((a["question"] for a in data.get("answers", [])), q)
    body = json.dumps({"model": name, "messages": [{"role": "user", "content": q}], "max_tokens": 64})
    return "\n".join(
        [
            "## Serve it yourself",
            "",
            "```bash",
            ". .venv/bin/activate",
            f"genloop serve --config {preset} --model {served} --knowledge {out}/serve   # Ctrl-C stops",
            "# in another terminal:",
            "curl -s http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\",
            f"  -d '{body.replace(chr(39), chr(39) + chr(92) + chr(39) + chr(39))}'",
            "```",
            "",
            'Any OpenAI client works too (`base_url="http://127.0.0.1:8000/v1"`); `genloop serve --help` lists the '
            "options.",
        ]
    )


def write_summary(
    out: Path, steps: Sequence[Any], outcomes: Sequence[Any], total_s: float, preset: str, served: str
) -> str:
    """Build every section whose artifact exists, write ``out/summary.md`` (plots beside it); returns the text."""
    from cluster.demo_alignment import ALIGNMENT_SUMMARIES

    sections = []
    for step in steps:
        fn = {**SUMMARIES, **ALIGNMENT_SUMMARIES}.get(step.summary or step.name)
        if fn is None:
            continue
        try:
            sec = fn(out, step, served)
        except Exception:  # a summary must never hide the demo's outcome
            log.exception("summary of %s failed", step.name)
            continue
        if sec is not None:
            sections.append(sec)
    text = render(sections, outcomes, total_s, preset) + "\n" + next_steps(out, preset, served) + "\n"
    (out / "summary.md").write_text(text)
    return text + f"\n(written to {out}/summary.md, plots beside it)"

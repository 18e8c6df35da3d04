"""``genloop demo`` / ``make demo``: every stage end to end on the embedded corpus (the stdlib), on one local Ray.

The demo is a list of ``Step``s (``steps()``): each an ordinary ``genloop`` command run in this process, so one
local Ray serves them all. A step whose artifact is already finished is skipped, so re-running resumes where it
stopped; ``--fresh`` starts over. Adding a stage is adding a ``Step`` (and, for the closing summary, a function in
``cluster/demo_summary.py``); ``policy_dir`` names the artifact ``serve --smoke`` serves: the last training stage's.

The terminal shows each step's command, its printed results and progress bars; Ray's and vLLM's chatter goes to
``<out>/demo.log``. At the end, a summary of the numbers per stage is printed and written to ``<out>/summary.md``
with the plots beside it, followed by how to start the server and query it.
"""

from __future__ import annotations

import logging
import shutil
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from cluster.console import Console
from cluster.demo_summary import policy_dir
from pipelines.artifacts import is_finished

log = logging.getLogger("genloop.demo")

SMOKE_QUESTIONS = 4  # held-out code-writing requests the served model answers
REWARD = "rm:{d}/reward:0.1,fn:judge_pass,fn:signature_match:0.5"  # the demo's RLHF reward (see steps())


@dataclass
class Step:
    name: str
    args: list[str] | Callable[[], list[str]]  # the genloop command line (a callable: built when the step starts)
    artifact: str | None  # folder whose finished manifest means "done"; None = always run
    summary: str | None = None  # the key in demo_summary.SUMMARIES that reads this step's numbers (default: name)

    def argv(self) -> list[str]:
        return self.args() if callable(self.args) else list(self.args)


def steps(out: Path, preset: str) -> list[Step]:
    d = str(out)
    stdlib = sysconfig.get_paths()["stdlib"]
    policy = policy_dir(out)
    return [
        Step("data", ["data", "--config", preset, "--out", f"{d}/data"], f"{d}/data"),
        Step("pretrain", ["pretrain", "--config", preset, "--data", f"{d}/data", "--out", f"{d}/pretrain"],
             f"{d}/pretrain"),
        Step("sft-data", ["sft-data", "--config", preset, "--out", f"{d}/sft-data"], f"{d}/sft-data"),
        Step("sft", ["sft", "--config", preset, "--init-from", f"{d}/pretrain", "--data", f"{d}/sft-data",
                     "--out", f"{d}/sft"], f"{d}/sft"),
        # alignment: the SFT model's own answers judged into pairs -> a reward model -> GRPO. The reward pays for a
        # judge pass (the requested signature, a real body) and, densely, for how close the def line is to the
        # requested one; the judge's partial grades are left out (GRPO then trades copying the name for short generic
        # functions: judge mean up, pass rate down), and the reward model has a small weight (at full weight GRPO
        # games it: its score rises while the judge's falls). update.filter_groups: only groups where some answers
        # pass and some fail are learned from (in an all-fail group GRPO's normalisation would turn the reward
        # model's tie-break into full-size advantages: measured, the pass rate then fell 15.6% -> 0%)
        Step("pref-data", ["pref-data", "--config", preset, "--policy", f"{d}/sft", "--prompts", f"{d}/sft-data",
                           "--out", f"{d}/pref-data"], f"{d}/pref-data"),
        Step("reward", ["reward", "--config", preset, "--init-from", f"{d}/sft", "--data", f"{d}/pref-data",
                        "--out", f"{d}/reward"], f"{d}/reward"),
        Step("rlhf", ["rlhf", "--config", preset, "--policy", f"{d}/sft", "--reward",
                      REWARD.format(d=d), "--prompts", f"{d}/sft-data", "--algo", "grpo",
                      "--out", f"{d}/rlhf", "update.filter_groups=judge_pass"], f"{d}/rlhf"),
        # SFT vs RLHF on held-out prompts: judge pass rate, reward-model score, KL to the SFT model
        Step("eval", ["eval", "--policy", f"{d}/sft", "--policy", f"{d}/rlhf", "--prompts", f"{d}/sft-data",
                      "--reference", f"{d}/sft", "--reward-model", f"{d}/reward", "--n-prompts", "128",
                      "--max-new-tokens", "64", "--out", f"{d}/eval.json"], None),
        # the knowledge store: two stdlib packages plus the modules the smoke questions' functions come from
        Step("knowledge", lambda: ["knowledge", "add", f"{stdlib}/json", f"{stdlib}/http",
                                   *smoke_sources(f"{d}/sft-data", SMOKE_QUESTIONS), "--store", f"{d}/serve"], None),
        Step("serve", ["serve", "--config", preset, "--model", policy, "--knowledge", f"{d}/serve",
                       "--smoke", str(SMOKE_QUESTIONS), "--smoke-questions", f"{d}/sft-data",
                       "--smoke-out", f"{d}/serve/smoke.json"], None),
        # the loop, once around: the ratings and preferences posted during serve --smoke, exported for the version
        # that was served: the next round's `genloop reward --data`
        Step("feedback", lambda: ["feedback", "export", "--store", f"{d}/serve/feedback.db", *served_version(d),
                                  "--out", f"{d}/serve/round1/prefs.jsonl"], None),
        Step("lineage", ["lineage", policy], None),
    ]


def served_version(d: str) -> list[str]:
    """``["--model-version", V]`` for the one model version ``serve --smoke`` answered with (its smoke.json), else
    nothing (every version is exported)."""
    import json

    f = Path(d) / "serve" / "smoke.json"
    versions = json.loads(f.read_text()).get("model_versions", []) if f.is_file() else []
    return ["--model-version", versions[0]] if len(versions) == 1 else []


def smoke_sources(sft_data: str, n: int) -> list[str]:
    """The source files of the first ``n`` held-out code-writing requests (what retrieval should find)."""
    import json

    from pipelines.sft.data import val_path

    files: list[str] = []
    path = Path(val_path(sft_data))
    if not path.is_file():
        return files
    for line in path.read_text().splitlines():
        meta = json.loads(line).get("meta", {})
        if meta.get("task") != "write":
            continue
        src = meta.get("source", "").rsplit(":", 1)[0]
        if src and Path(src).is_file() and src not in files:
            files.append(src)
        n -= 1
        if n == 0:
            break
    return files


@dataclass
class Outcome:
    name: str
    status: str  # ok | skipped | failed (rc) | interrupted | not run
    seconds: float


def run(out: Path, preset: str = "demo", fresh: bool = False, only: list[str] | None = None,
        verbose: bool = False) -> int:
    from cluster.demo_summary import write_summary

    if fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    all_steps = steps(out, preset)
    todo = [s for s in all_steps if not only or s.name in only]
    unknown = sorted(set(only or []) - {s.name for s in all_steps})
    if unknown:
        raise ValueError(f"--only {' '.join(unknown)}: no such step; steps: {', '.join(s.name for s in all_steps)}")
    outcomes: list[Outcome] = []
    t_all = time.perf_counter()
    with Console(out / "demo.log", verbose=verbose) as con:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                            datefmt="%H:%M:%S")
        con.say(f"genloop demo: {len(todo)} steps on the {preset!r} preset into {out}/ "
                f"(Ray's and vLLM's logs: {out}/demo.log)")
        try:
            _run_steps(con, todo, outcomes, out)
        finally:  # the summary of what ran, whatever happened
            ran = {o.name for o in outcomes}
            outcomes += [Outcome(s.name, "not run", 0.0) for s in todo if s.name not in ran]
            text = write_summary(out, all_steps, outcomes, time.perf_counter() - t_all, preset)
            con.say("\n" + text)
    return 0 if all(o.status in ("ok", "skipped") for o in outcomes) else 1


def _run_steps(con: Console, todo: list[Step], outcomes: list[Outcome], out: Path) -> None:
    from cluster.cli import main as genloop

    for i, step in enumerate(todo, 1):
        con.quiet_loggers()
        if step.artifact and is_finished(step.artifact):
            con.say(f"\n== [{i}/{len(todo)}] {step.name}: already finished at {step.artifact}, skipped")
            outcomes.append(Outcome(step.name, "skipped", 0.0))
            continue
        argv = step.argv()
        con.say(f"\n== [{i}/{len(todo)}] {step.name}: genloop {' '.join(argv)}")
        t = time.perf_counter()
        try:
            rc = genloop(argv)
        except KeyboardInterrupt:
            outcomes.append(Outcome(step.name, "interrupted", time.perf_counter() - t))
            con.say(f"   {step.name}: interrupted")
            break
        except Exception:  # a bug, not a user error: keep the traceback in the log, say where it is
            log.exception("step %s crashed", step.name)
            rc = 1
        con.quiet_loggers()
        secs = time.perf_counter() - t
        outcomes.append(Outcome(step.name, "ok" if rc == 0 else f"failed ({rc})", secs))
        con.say(f"   {step.name}: {'ok' if rc == 0 else 'FAILED'} in {secs:.0f} s")
        if rc != 0:
            con.say(f"   the last lines of {out}/demo.log:\n{con.tail(30)}")
            break

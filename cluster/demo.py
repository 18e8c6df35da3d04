"""``genloop demo`` / ``make demo``: every stage end to end on the embedded corpus (the stdlib), on one local Ray.

The demo is a list of ``Step``s (``steps()``): each an ordinary ``genloop`` command run in this process, so one
local Ray serves them all. A step whose artifact is already finished is skipped, so re-running resumes where it
stopped; ``--fresh`` starts over. Adding a stage is adding a ``Step`` (and, for the closing summary, a function in
``cluster/demo_summary.py``); ``policy_dir`` names the artifact ``serve --smoke`` serves: the last training stage's.

Everything the demo runs with is in its preset (``configs/demo.yaml``; ``--config tiny`` for the tests' sizes): each
stage's section, and a ``demo:`` section for the steps that take no ``--config`` (eval, knowledge, serve's smoke
questions: ``DemoConfig``). This file only wires the steps' inputs and outputs together; the one value it sets is the
folder of the RLHF reward's reward-model part (``rm:...`` in ``rlhf.reward``), which it points at this run's own
``reward`` step (``demo_reward``).

The terminal shows each step's command, its printed results and progress bars; Ray's and vLLM's chatter goes to
``<out>/demo.log``. At the end, a summary of the numbers per stage is printed and written to ``<out>/summary.md``
with the plots beside it, followed by how to start the server and query it.
"""

from __future__ import annotations

import logging
import shutil
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from cluster.console import Console
from pipelines.artifacts import is_finished
from pipelines.config import ConfigError, build_config, load_yaml

log = logging.getLogger("genloop.demo")


@dataclass
class DemoEvalConfig:
    """The eval step (``genloop eval``, SFT vs RLHF): greedy answers to held-out code-writing prompts."""

    n_prompts: int = 96
    max_new_tokens: int = 64


@dataclass
class DemoRealModelConfig:
    """The real-model steps: a pretrained model imported (``import-model``), aligned with GRPO on generated problems
    with verifiable answers (``tasks arithmetic`` -> ``rlhf``), both evaluated greedy on the held-out problems
    (``eval``, 95% intervals), and the aligned model served. ``enabled: false`` leaves them out (the from-scratch
    chain's last model is served)."""

    enabled: bool = True
    source: str = "smollm2-135m-instruct"  # import-model's SRC: a packaged model, an HF folder or a .gguf file
    config: str = "smollm2"  # the preset whose rlhf: section (reward, sampling, learner) the GRPO step runs
    iterations: int = 6  # GRPO iterations (the preset's own count is the longer run)
    rlhf: list[str] = field(default_factory=list)  # further key=value overrides on that rlhf: section
    n: int = 2000  # train problems (tasks arithmetic --n)
    heldout: int = 128  # held-out problems (never trained on); eval answers all of them
    digits: int = 2
    ops: str = "+"
    seed: int = 0
    reward: str = "fn:exact_answer,fn:number_answer"  # what eval reports per policy
    max_new_tokens: int = 16  # eval's answer length (the rlhf section samples its own)

    def validate(self) -> None:
        if min(self.iterations, self.n, self.heldout, self.digits, self.max_new_tokens) < 1:
            raise ConfigError(
                f"demo.real_model: iterations ({self.iterations}), n ({self.n}), heldout ({self.heldout}), digits "
                f"({self.digits}) and max_new_tokens ({self.max_new_tokens}) must be >= 1"
            )


@dataclass
class DemoConfig:
    """A preset's ``demo:`` section: the settings of the demo steps that take no ``--config`` of their own."""

    eval: DemoEvalConfig = field(default_factory=DemoEvalConfig)
    smoke_questions: int = 4  # held-out code-writing requests the served model answers (serve --smoke)
    knowledge: list[str] = field(default_factory=lambda: ["json", "http"])  # stdlib packages in the knowledge store
    # the from-scratch model's own alignment: pref-data -> reward -> rlhf -> eval (SFT vs RLHF). Off in the 15-minute
    # demo: a 3M-parameter model moves its judge pass rate by a point or two, inside the noise; the real model's
    # GRPO (real_model) is where alignment shows
    from_scratch_alignment: bool = False
    real_model: DemoRealModelConfig = field(default_factory=DemoRealModelConfig)

    def validate(self) -> None:
        if self.eval.n_prompts < 1 or self.eval.max_new_tokens < 1 or self.smoke_questions < 1:
            raise ConfigError(
                f"demo: eval.n_prompts ({self.eval.n_prompts}), eval.max_new_tokens "
                f"({self.eval.max_new_tokens}) and smoke_questions ({self.smoke_questions}) must be >= 1"
            )
        self.real_model.validate()


def demo_config(preset: str, overrides: Sequence[str] = ()) -> DemoConfig:
    """The preset's ``demo:`` section with ``key=value`` overrides (``real_model.iterations=14``)."""
    cfg = build_config(DemoConfig, "demo", preset, list(overrides))
    cfg.validate()
    return cfg


def policy_dir(out: Path, dc: DemoConfig) -> str:
    """The model the demo serves: the last training stage's artifact (the real model's GRPO policy; without the
    real-model steps, the from-scratch RLHF policy, or its SFT model when its alignment is off)."""
    if dc.real_model.enabled:
        return f"{out}/grpo"
    return f"{out}/rlhf" if dc.from_scratch_alignment else f"{out}/sft"


def demo_reward(spec: str, out: Path) -> str:
    """The preset's ``rlhf.reward`` with each reward-model part (``rm:DIR[:W]``) pointed at this run's own reward
    step, ``<out>/reward`` (the presets name ``runs/demo/reward``: the default ``--out``'s); other parts as written."""
    parts = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        if part.startswith("rm:"):
            head, _, weight = part[3:].rpartition(":")
            part = f"rm:{out}/reward" + (f":{weight}" if head and _is_number(weight) else "")
        parts.append(part)
    return ",".join(parts)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def rlhf_argv(out: Path, preset: str) -> list[str]:
    """The rlhf step: the preset's ``rlhf:`` section (reward, algo, group filter, sizes) on this run's folders;
    ``--reward`` only where the reward model's folder differs from the preset's (another ``--out``)."""
    d = str(out)
    section = load_yaml(preset).get("rlhf") or {}
    spec = section.get("reward", "") if isinstance(section, dict) else ""
    argv = ["rlhf", "--config", preset, "--policy", f"{d}/sft", "--prompts", f"{d}/sft-data", "--out", f"{d}/rlhf"]
    if spec and demo_reward(spec, out) != spec:
        argv[3:3] = ["--reward", demo_reward(spec, out)]
    return argv


@dataclass
class Step:
    name: str
    args: list[str] | Callable[[], list[str]]  # the genloop command line (a callable: built when the step starts)
    artifact: str | None  # folder whose finished manifest means "done"; None = always run
    summary: str | None = None  # the key in demo_summary.SUMMARIES that reads this step's numbers (default: name)

    def argv(self) -> list[str]:
        return self.args() if callable(self.args) else list(self.args)


def steps(out: Path, preset: str, overrides: Sequence[str] = ()) -> list[Step]:
    """The demo's steps in order: the from-scratch chain (data -> pretrain -> sft, and its own alignment where
    ``from_scratch_alignment``), the real model's (import -> tasks -> grpo -> eval-grpo), then knowledge -> serve ->
    feedback -> lineage on the last model trained."""
    d = str(out)
    dc = demo_config(preset, overrides)
    policy = policy_dir(out, dc)
    chain = [
        Step("data", ["data", "--config", preset, "--out", f"{d}/data"], f"{d}/data"),
        Step(
            "pretrain",
            ["pretrain", "--config", preset, "--data", f"{d}/data", "--out", f"{d}/pretrain"],
            f"{d}/pretrain",
        ),
        Step("sft-data", ["sft-data", "--config", preset, "--out", f"{d}/sft-data"], f"{d}/sft-data"),
        Step(
            "sft",
            ["sft", "--config", preset, "--init-from", f"{d}/pretrain", "--data", f"{d}/sft-data", "--out", f"{d}/sft"],
            f"{d}/sft",
        ),
    ]
    if dc.from_scratch_alignment:
        chain += _alignment_steps(d, preset, dc)
    if dc.real_model.enabled:
        chain += _real_model_steps(d, dc.real_model)
    return chain + _serving_steps(d, preset, dc, policy)


def _alignment_steps(d: str, preset: str, dc: DemoConfig) -> list[Step]:
    """The from-scratch model aligned: its own answers judged into pairs -> a reward model -> GRPO (its reward and
    group filter, and why: the preset's rlhf: section) -> SFT vs RLHF on held-out prompts."""
    return [
        Step(
            "pref-data",
            ["pref-data", "--config", preset, "--policy", f"{d}/sft", "--prompts", f"{d}/sft-data"]
            + ["--out", f"{d}/pref-data"],
            f"{d}/pref-data",
        ),
        Step(
            "reward",
            ["reward", "--config", preset, "--init-from", f"{d}/sft", "--data", f"{d}/pref-data"]
            + ["--out", f"{d}/reward"],
            f"{d}/reward",
        ),
        Step("rlhf", rlhf_argv(Path(d), preset), f"{d}/rlhf"),
        # judge pass rate, reward-model score, KL to the SFT model
        Step(
            "eval",
            ["eval", "--policy", f"{d}/sft", "--policy", f"{d}/rlhf", "--prompts", f"{d}/sft-data"]
            + ["--reference", f"{d}/sft", "--reward-model", f"{d}/reward"]
            + ["--n-prompts", str(dc.eval.n_prompts), "--max-new-tokens", str(dc.eval.max_new_tokens)]
            + ["--out", f"{d}/eval.json"],
            None,
        ),
    ]


def _real_model_steps(d: str, rm: DemoRealModelConfig) -> list[Step]:
    """A pretrained model imported, aligned with GRPO on problems with verifiable answers, and evaluated greedy on
    the held-out problems before and after (each rate with its 95% interval, KL to the imported model)."""
    return [
        Step("import", ["import-model", rm.source, "--out", f"{d}/real"], f"{d}/real"),
        Step(
            "tasks",
            ["tasks", "arithmetic", "--out", f"{d}/arith", "--n", str(rm.n), "--heldout", str(rm.heldout)]
            + ["--digits", str(rm.digits), "--ops", rm.ops, "--seed", str(rm.seed)],
            f"{d}/arith",
        ),
        Step(
            "grpo",
            ["rlhf", "--config", rm.config, "--policy", f"{d}/real", "--prompts", f"{d}/arith", "--out", f"{d}/grpo"]
            + [f"iterations={rm.iterations}", *rm.rlhf],
            f"{d}/grpo",
        ),
        Step(
            "eval-grpo",
            ["eval", "--policy", f"{d}/real", "--policy", f"{d}/grpo", "--reference", f"{d}/real"]
            + ["--prompts", f"{d}/arith", "--reward", rm.reward, "--n-prompts", str(rm.heldout)]
            + ["--max-new-tokens", str(rm.max_new_tokens), "--out", f"{d}/eval-grpo.json"],
            None,
        ),
    ]


def _serving_steps(d: str, preset: str, dc: DemoConfig, policy: str) -> list[Step]:
    stdlib = sysconfig.get_paths()["stdlib"]
    return [
        # the knowledge store: stdlib packages plus the modules the smoke questions' functions come from
        Step(
            "knowledge",
            lambda: [
                "knowledge",
                "add",
                *(f"{stdlib}/{pkg}" for pkg in dc.knowledge),
                *smoke_sources(f"{d}/sft-data", dc.smoke_questions),
                "--store",
                f"{d}/serve",
            ],
            None,
        ),
        Step(
            "serve",
            ["serve", "--config", preset, "--model", policy, "--knowledge", f"{d}/serve"]
            + ["--smoke", str(dc.smoke_questions), "--smoke-questions", f"{d}/sft-data"]
            + ["--smoke-out", f"{d}/serve/smoke.json"],
            None,
        ),
        # the loop, once around: the ratings and preferences posted during serve --smoke, exported for the version
        # that was served: the next round's `genloop reward --data`
        Step(
            "feedback",
            lambda: [
                "feedback",
                "export",
                "--store",
                f"{d}/serve/feedback.db",
                *served_version(d),
                "--out",
                f"{d}/serve/round1/prefs.jsonl",
            ],
            None,
        ),
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


def run(
    out: Path,
    preset: str = "demo",
    fresh: bool = False,
    only: list[str] | None = None,
    verbose: bool = False,
    overrides: Sequence[str] = (),
) -> int:
    from cluster.demo_summary import write_summary

    if fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    all_steps = steps(out, preset, overrides)
    served = policy_dir(out, demo_config(preset, overrides))
    todo = [s for s in all_steps if not only or s.name in only]
    unknown = sorted(set(only or []) - {s.name for s in all_steps})
    if unknown:
        raise ValueError(f"--only {' '.join(unknown)}: no such step; steps: {', '.join(s.name for s in all_steps)}")
    outcomes: list[Outcome] = []
    t_all = time.perf_counter()
    with Console(out / "demo.log", verbose=verbose) as con:
        logging.basicConfig(
            level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
        )
        con.say(
            f"genloop demo: {len(todo)} steps on the {preset!r} preset into {out}/ "
            f"(Ray's and vLLM's logs: {out}/demo.log)"
        )
        try:
            _run_steps(con, todo, outcomes, out)
        finally:  # the summary of what ran, whatever happened
            ran = {o.name for o in outcomes}
            outcomes += [Outcome(s.name, "not run", 0.0) for s in todo if s.name not in ran]
            text = write_summary(out, all_steps, outcomes, time.perf_counter() - t_all, preset, served)
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

"""GRPO: genloop (vLLM rollout actor + Ray Train learner) vs TRL's ``GRPOTrainer`` (trl==1.16.0, the ``bench``
extra) on the same checkpoint, prompts, group size, reward function and hyper-parameters, on the same cores. Prints
wall seconds per iteration (one generation batch and its ``--epochs x --minibatches`` optimizer steps), the start-up
before the first iteration, and the mean reward of the first and the last iterations for each; the LAST line is the
ratio TRL / genloop seconds per iteration (goal > 1 at an equal or better reward).

    python bench/rlhf_bench.py [--model tiny|smollm2|PATH] [--task toy|arithmetic] [--preset tiny]
                               [--iterations 10] [--prompts 4] [--group 4] [--max-new-tokens 32] [--temperature 1]
                               [--epochs 2] [--minibatches 2] [--lr 1e-2] [--cpus 2] [--only genloop|trl]

``--model tiny`` (default): the tests' tiny checkpoint (random weights, matrices x5 so the policy is not uniform,
``--preset``) on the toy task (``--task toy``): a verifiable reward, the share of an answer's characters that are
whitespace. ``--model smollm2``: the imported SmolLM2-135M-Instruct (``genloop import-model smollm2-135m-instruct``,
run once into ``$GENLOOP_BENCH_SMOLLM2`` or ~/.cache/genloop/bench/smollm2-135m-instruct); ``--model PATH``: any
imported folder (an artifact holding model/, or the model folder). A real model defaults to ``--task arithmetic``:
the train split of ``genloop tasks arithmetic`` (2-digit addition, seed 0) with the reward ``--reward``
(default ``number_answer,exact_answer``: pipelines/rewards.py's built-ins, summed, called through the same
``RewardSet`` on both sides with the rows' ``answer`` column), lr 2e-5 unless given.
Both sides: the same prompt text (the checkpoint's chat template), ``--temperature``, no top-k/top-p, the same stop
tokens (<|endoftext|>, <|im_end|>), clip eps 0.2, no KL (beta 0), std-normalised group advantages, token-mean loss
over each minibatch, each generation batch used for ``--epochs`` passes of ``--minibatches`` optimizer steps (TRL:
``num_iterations``, ``steps_per_generation``), AdamW (0.9, 0.999), no weight decay, constant lr, grad clip 1, fp32
(genloop's RLHF learner has no bf16 autocast on CPU, so TRL runs fp32 too). genloop runs 1 engine (1 CPU) + 1
learner rank (``--cpus`` - 1 CPUs, ``--cpus`` torch threads: the engine waits while the learner works) on an
embedded Ray with ``--cpus`` CPUs; TRL runs in one process with ``--cpus`` torch threads (HF ``generate`` for
rollouts).
Per-iteration time excludes start-up on both sides (engine / model loading, Ray start): start-up is printed apart
(total wall minus the iterations), with the total wall. The mean reward of an iteration is over its generation
batch, recorded by the reward function itself on the TRL side (what genloop logs as reward_mean).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


SMOLLM2 = "smollm2-135m-instruct"


@dataclass
class Task:
    """What both sides train on: genloop reads ``prompts`` (JSONL) and ``reward`` (a ``--reward`` spec); TRL gets
    ``rows`` ({"prompt": the same prompt text rendered with the checkpoint's chat template, **the other columns}) and
    scores through the same ``RewardSet``."""

    prompts: Path
    reward: str
    rows: list[dict]


def write_inputs(work: Path, n: int) -> Path:
    with open(work / "prompts.jsonl", "w") as f:
        for i in range(n):
            f.write(
                json.dumps(
                    {
                        "messages": [
                            {"role": "user", "content": f"Write a Python function `f{i}(x)` that returns x plus {i}."},
                            {"role": "assistant", "content": f"def f{i}(x):\n    return x + {i}"},
                        ],
                        "meta": {"task": "write"},
                    }
                )
                + "\n"
            )
    (work / "reward.py").write_text(
        "def whitespace(prompts, responses):\n"
        "    return [sum(c in ' \\n' for c in r) / max(1, len(r)) for r in responses]\n"
    )
    return work / "prompts.jsonl"


def toy_task(work: Path, ckpt: str) -> Task:
    """The tests' toy task: 16 code prompts, the whitespace-share reward from a user file."""
    from models.chat import ChatFormat

    prompts = write_inputs(work, 16)
    fmt = ChatFormat.from_checkpoint(ckpt)
    rows = [json.loads(line) for line in prompts.read_text().splitlines()]
    trl_rows = [{"prompt": fmt.render(r["messages"][:-1], add_generation_prompt=True)} for r in rows]
    return Task(prompts, f"fn:{work / 'reward.py'}:whitespace", trl_rows)


def arithmetic_task(work: Path, ckpt: str, n: int, reward: str, seed: int) -> Task:
    """``genloop tasks arithmetic`` (2-digit addition, ``seed``): the first ``n`` rows of its train split, so both
    sides draw their batches from the same prompts (``n`` = prompts x iterations: each seen about once)."""
    from models.chat import ChatFormat
    from pipelines.tasks import ArithmeticConfig, run_arithmetic

    run_arithmetic(ArithmeticConfig(out=str(work / "tasks"), seed=seed))
    rows = [json.loads(line) for line in (work / "tasks" / "train.jsonl").read_text().splitlines()][:n]
    prompts = work / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": r["prompt"], "answer": r["answer"]}) + "\n" for r in rows))
    fmt = ChatFormat.from_checkpoint(ckpt)
    trl_rows = [
        {
            "prompt": fmt.render([{"role": "user", "content": r["prompt"]}], add_generation_prompt=True),
            "answer": r["answer"],
        }
        for r in rows
    ]
    spec = ",".join(f"fn:{name.strip()}" for name in reward.split(",") if name.strip())
    return Task(prompts, spec, trl_rows)


def run_genloop(a, ckpt: str, work: Path, task: Task) -> tuple[list[float], list[float], float, float]:
    """(seconds per iteration, mean reward per iteration, start-up, total wall)."""
    import ray

    from pipelines.config import from_dict
    from pipelines.rlhf.config import RlhfConfig
    from pipelines.rlhf.stage import run

    t0, t0_unix = time.perf_counter(), time.time()
    start_ray(a.cpus)
    cfg = from_dict(
        RlhfConfig,
        {
            "policy": str(ckpt),
            "prompts": str(task.prompts),
            "out": str(work / "genloop"),
            "algo": "grpo",
            "reward": task.reward,
            "prompt_tasks": [],
            "iterations": a.iterations,
            "seed": a.seed,
            "rollout": {
                "engines": 1,
                "cpus_per_engine": 1,
                "prompts_per_iter": a.prompts,
                "group_size": a.group,
                "sampling": {"max_new_tokens": a.max_new_tokens, "temperature": a.temperature},
                # the learner waits while the engine samples: the engine computes on every CPU, as TRL's generate does
                "engine": {"max_model_len": 128, "max_num_seqs": a.prompts * a.group, "cpu_threads": a.cpus},
            },
            "update": {
                "epochs": a.epochs,
                "minibatches": a.minibatches,
                "old_logp": a.old_logp,
                "eps_low": 0.2,
                "eps_high": 0.2,
                "norm_std": True,
            },
            "kl": {"coef": 0.0},
            "train": {
                "num_workers": 1,
                "strategy": "none",
                "cpus_per_worker": max(1, a.cpus - 1),
                "threads": a.cpus,
                "micro_batch_size": a.prompts * a.group,
                "lr": a.lr,
                "weight_decay": 0.0,
                "betas": [0.9, 0.999],
                "grad_clip": 1.0,
                "ckpt_every": 0,
            },
        },
    )
    res = run(cfg)
    ray.shutdown()
    h = res.history
    startup = h[0]["started_at"] - t0_unix
    return [r["t_iteration"] for r in h], [r["reward_mean"] for r in h], startup, time.perf_counter() - t0


def start_ray(cpus: int) -> None:
    """An embedded Ray with ``cpus`` CPUs; on a loaded machine the raylet can miss Ray's fixed 30 s start-up window,
    so try three times."""
    import ray

    from cluster.runtime import init_ray

    for attempt in range(3):
        try:
            init_ray(num_cpus=cpus)
            return
        except Exception as e:  # ray raises a bare Exception for a start-up timeout
            if "timed out during startup" not in str(e) or attempt == 2:
                raise
            ray.shutdown()


def run_trl(a, ckpt: str, work: Path, task: Task) -> tuple[list[float], list[float], float, float]:
    """(seconds per iteration, mean reward per iteration, start-up, total wall). Start-up counts TRL's imports, as
    genloop's counts its processes' imports."""
    t0 = time.perf_counter()
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from models.checkpoint import load_tokenizer
    from pipelines.rewards import RewardSet

    torch.set_num_threads(a.cpus)
    tok = AutoTokenizer.from_pretrained(ckpt)
    ours = load_tokenizer(ckpt)
    first = task.rows[0]["prompt"]
    if tok(first, add_special_tokens=False)["input_ids"] != ours.encode(first, allow_special=True):
        print("warning: TRL's tokenizer encodes the prompt text differently from genloop's", flush=True)
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    model.generation_config.eos_token_id = [ours.eot_id, ours.im_end_id]  # genloop's stop tokens
    rewards = RewardSet.from_spec(task.reward)  # genloop's own reward code, called the same way
    columns = [k for k in task.rows[0] if k != "prompt"]

    batch_rewards: list[float] = []  # the mean reward of each generation batch (one call per batch)

    def reward(prompts, completions, **kw):
        r, _ = rewards.score(list(prompts), list(completions), columns={k: kw[k] for k in columns})
        batch_rewards.append(sum(r) / len(r))
        return r

    class Timer(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []

        def on_step_begin(self, args, state, control, **kw):
            self.t = time.perf_counter()
            if not self.times:
                self.first = self.t

        def on_step_end(self, args, state, control, **kw):
            self.times.append(time.perf_counter() - self.t)

    timer = Timer()
    steps = a.epochs * a.minibatches  # optimizer steps per generation batch
    args = GRPOConfig(
        output_dir=str(work / "trl"),
        per_device_train_batch_size=a.prompts * a.group // a.minibatches,
        steps_per_generation=a.minibatches,
        num_iterations=a.epochs,
        gradient_accumulation_steps=1,
        num_generations=a.group,
        max_completion_length=a.max_new_tokens,
        learning_rate=a.lr,
        max_steps=a.iterations * steps,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        adam_beta1=0.9,
        adam_beta2=0.999,
        max_grad_norm=1.0,
        beta=0.0,
        epsilon=0.2,
        scale_rewards="group",
        loss_type="dapo",
        temperature=a.temperature,
        top_p=1.0,
        top_k=0,
        use_vllm=False,
        use_cpu=True,
        bf16=False,
        fp16=False,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=a.seed,
        dataloader_num_workers=0,
        disable_dropout=True,
    )
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=[reward],
        args=args,
        train_dataset=Dataset.from_list(task.rows),
        processing_class=tok,
        callbacks=[timer],
    )
    trainer.train()
    if len(timer.times) != a.iterations * steps or len(batch_rewards) != a.iterations:
        raise RuntimeError(
            f"TRL ran {len(timer.times)} optimizer steps and {len(batch_rewards)} generation batches; "
            f"expected {a.iterations * steps} and {a.iterations}"
        )
    per_iteration = [sum(timer.times[i : i + steps]) for i in range(0, len(timer.times), steps)]
    return per_iteration, batch_rewards, timer.first - t0, time.perf_counter() - t0


def real_model(model: str) -> str:
    """The model folder of ``--model smollm2`` (imported once into the cache) or of an imported ``PATH``."""
    from pipelines.artifacts import checkpoint_dir

    if model == "smollm2":
        default = Path.home() / ".cache" / "genloop" / "bench" / SMOLLM2
        out = Path(os.environ.get("GENLOOP_BENCH_SMOLLM2", default))
        if not (out / "manifest.json").exists():
            print(f"importing {SMOLLM2} into {out} (once)", flush=True)
            root = Path(__file__).resolve().parent.parent
            cmd = [sys.executable, "-m", "cluster.cli", "import-model", SMOLLM2, "--out", str(out), "--overwrite"]
            subprocess.run(cmd, check=True, cwd=root)
        model = str(out)
    return checkpoint_dir(model)


def build(work: Path, preset: str):
    import torch

    from models.checkpoint import save_checkpoint
    from models.tokenizer import train
    from models.transformer import Transformer, model_preset

    files = sorted(glob.glob(str(Path(sysconfig.get_paths()["stdlib"]) / "*.py")))[:60]
    tok = train([Path(f).read_text(errors="replace") for f in files], vocab_size=1024)
    torch.manual_seed(0)
    model = Transformer(model_preset(preset).for_tokenizer(tok.n_vocab))
    with torch.no_grad():  # as the tests' tiny checkpoint: a policy that is not uniform, so the toy reward can rise
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(5)
    return save_checkpoint(model, tok, work / "policy")


def summary(name: str, times: list[float], rewards: list[float], startup: float, wall: float) -> tuple[float, float]:
    per_it = statistics.median(times[1:] if len(times) > 1 else times)
    k = max(1, min(2, len(rewards) // 2))  # first k / last k iterations (k = 2 from 4 iterations on)
    start, end = sum(rewards[:k]) / k, sum(rewards[-k:]) / k
    print(
        f"{name:8s} {per_it:.2f} s/iteration (median after the first; first {times[0]:.2f} s), start-up "
        f"{startup:.1f} s before the first iteration (total wall {wall:.0f} s), mean reward of the first {k} / "
        f"last {k} iterations {start:.3f} -> {end:.3f} (each: {' '.join(f'{r:.2f}' for r in rewards)})",
        flush=True,
    )
    return per_it, end


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tiny", help=f"tiny | smollm2 ({SMOLLM2}, imported once) | PATH")
    ap.add_argument("--task", choices=["toy", "arithmetic"], help="default: toy for tiny, else arithmetic")
    ap.add_argument("--reward", default="number_answer,exact_answer", help="arithmetic: built-in rewards, summed")
    ap.add_argument("--preset", default="tiny", help="--model tiny: the model preset")
    ap.add_argument("--iterations", type=int, default=10)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--group", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--minibatches", type=int, default=2)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument(
        "--old-logp",
        choices=["learner", "rollout"],
        default="learner",
        help="genloop's update.old_logp: the ratio against the learner's no-grad pass (as TRL) or vLLM's sampling "
        "log-probs (no extra pass; fp32 engine and learner agree to ~1e-9)",
    )
    ap.add_argument("--lr", type=float, help="default: 1e-2 for tiny, else 2e-5")
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", choices=["genloop", "trl"], help="run one side (no ratio)")
    a = ap.parse_args()
    a.task = a.task or ("toy" if a.model == "tiny" else "arithmetic")
    a.lr = a.lr if a.lr is not None else (1e-2 if a.model == "tiny" else 2e-5)
    if (a.prompts * a.group) % a.minibatches:
        ap.error(f"--prompts x --group = {a.prompts * a.group} answers do not split into {a.minibatches} minibatches")
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())} on {os.cpu_count()} CPUs")
    work = Path(tempfile.mkdtemp(prefix="genloop-rlhf-bench-"))
    ckpt = str(build(work, a.preset)) if a.model == "tiny" else real_model(a.model)
    if a.task == "toy":
        task = toy_task(work, ckpt)
    else:
        task = arithmetic_task(work, ckpt, a.prompts * a.iterations, a.reward, a.seed)
    print(
        f"model {ckpt}, task {a.task} ({len(task.rows)} prompts, reward {task.reward}), {a.iterations} iterations "
        f"of {a.prompts} prompts x {a.group} answers, {a.max_new_tokens} new tokens, temperature {a.temperature}, "
        f"{a.epochs} epochs x {a.minibatches} minibatches (genloop old log-probs: {a.old_logp}), lr {a.lr:g}, fp32, "
        f"{a.cpus} CPUs",
        flush=True,
    )
    if a.only != "trl":
        g = summary("genloop", *run_genloop(a, ckpt, work, task))
        print(f"load average after genloop: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if a.only != "genloop":
        t = summary("TRL", *run_trl(a, ckpt, work, task))
        print(f"load average after TRL: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if a.only:
        return
    print(
        f"ratio TRL/genloop seconds per iteration = {t[0] / g[0]:.2f}x (goal >= 1.5); mean reward after "
        f"{a.iterations} iterations: genloop {g[1]:.3f} vs TRL {t[1]:.3f}"
    )


if __name__ == "__main__":
    main()

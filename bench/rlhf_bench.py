"""GRPO: genloop (vLLM rollout actor + Ray Train learner) vs TRL's ``GRPOTrainer`` (trl==1.16.0, the ``bench``
extra) on the same randomly initialised checkpoint, prompts, group size, reward function and hyper-parameters, on the
same cores. Prints wall seconds per iteration (one generation batch and its ``--epochs x --minibatches`` optimizer
steps) and the mean reward of the first and the last two iterations for each; the LAST line is the ratio TRL /
genloop seconds per iteration (goal > 1 at an equal or better reward).

    python bench/rlhf_bench.py [--preset tiny] [--iterations 10] [--prompts 4] [--group 4] [--max-new-tokens 32]
                               [--epochs 2] [--minibatches 2] [--lr 1e-2] [--cpus 2]

The task is the tests' toy task with a verifiable reward (the share of an answer's characters that are whitespace) on
the tests' tiny checkpoint (random weights, matrices x5 so the policy is not uniform). Both sides: temperature 1, no
top-k/top-p, the same stop tokens (<|endoftext|>, <|im_end|>), clip eps 0.2, no KL (beta 0), std-normalised group
advantages, token-mean loss over each minibatch, each generation batch used for ``--epochs`` passes of
``--minibatches`` optimizer steps (TRL: ``num_iterations``, ``steps_per_generation``), AdamW (0.9, 0.999), no weight
decay, constant lr, grad clip 1. genloop runs 1 engine (1 CPU) + 1 learner rank (``--cpus`` - 1 CPUs, ``--cpus``
torch threads: the engine waits while the learner works) on an embedded Ray with ``--cpus`` CPUs; TRL runs in one
process with ``--cpus`` torch threads (HF ``generate`` for rollouts).
Per-iteration time excludes start-up on both sides (engine / model loading, Ray start); the total wall of each is
printed too. The mean reward of an iteration is over its generation batch, recorded by the reward function itself on
the TRL side (what genloop logs as reward_mean).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def whitespace(prompts: list[str], responses: list[str]) -> list[float]:
    """The toy task's verifiable reward."""
    return [sum(c in " \n" for c in r) / max(1, len(r)) for r in responses]


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


def run_genloop(a, ckpt: Path, work: Path) -> tuple[list[float], list[float], float]:
    """(seconds per iteration, mean reward per iteration, total wall)."""
    import ray

    from pipelines.config import from_dict
    from pipelines.rlhf.config import RlhfConfig
    from pipelines.rlhf.stage import run

    t0 = time.perf_counter()
    start_ray(a.cpus)
    cfg = from_dict(
        RlhfConfig,
        {
            "policy": str(ckpt),
            "prompts": str(work / "prompts.jsonl"),
            "out": str(work / "genloop"),
            "algo": "grpo",
            "reward": f"fn:{work / 'reward.py'}:whitespace",
            "iterations": a.iterations,
            "seed": a.seed,
            "rollout": {
                "engines": 1,
                "cpus_per_engine": 1,
                "prompts_per_iter": a.prompts,
                "group_size": a.group,
                "sampling": {"max_new_tokens": a.max_new_tokens, "temperature": 1.0},
                "engine": {"max_model_len": 128, "max_num_seqs": a.prompts * a.group},
            },
            "update": {
                "epochs": a.epochs,
                "minibatches": a.minibatches,
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
    return [r["t_iteration"] for r in res.history], [r["reward_mean"] for r in res.history], time.perf_counter() - t0


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


def run_trl(a, ckpt: Path, prompts_file: Path) -> tuple[list[float], list[float], float]:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from models.chat import ChatFormat

    t0 = time.perf_counter()
    torch.set_num_threads(a.cpus)
    fmt = ChatFormat.from_checkpoint(ckpt)
    rows = [json.loads(line) for line in prompts_file.read_text().splitlines()]
    texts = [fmt.render(r["messages"][:-1], add_generation_prompt=True) for r in rows]  # the same prompt tokens
    tok = AutoTokenizer.from_pretrained(str(ckpt))
    model = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32)

    batch_rewards: list[float] = []  # the mean reward of each generation batch (one call per batch)

    def reward(prompts, completions, **_):
        r = whitespace(prompts, completions)
        batch_rewards.append(sum(r) / len(r))
        return r

    class Timer(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []

        def on_step_begin(self, args, state, control, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.times.append(time.perf_counter() - self.t)

    timer = Timer()
    steps = a.epochs * a.minibatches  # optimizer steps per generation batch
    args = GRPOConfig(
        output_dir=str(prompts_file.parent / "trl"),
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
        temperature=1.0,
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
        train_dataset=Dataset.from_list([{"prompt": t} for t in texts]),
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
    return per_iteration, batch_rewards, time.perf_counter() - t0


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


def summary(name: str, times: list[float], rewards: list[float], wall: float) -> tuple[float, float]:
    per_it = statistics.median(times[1:] if len(times) > 1 else times)
    start, end = sum(rewards[:2]) / len(rewards[:2]), sum(rewards[-2:]) / len(rewards[-2:])
    print(
        f"{name:8s} {per_it:.2f} s/iteration (median after the first; first {times[0]:.2f} s), mean reward of the "
        f"first 2 / last 2 iterations {start:.3f} -> {end:.3f} (each: {' '.join(f'{r:.2f}' for r in rewards)}), "
        f"total wall {wall:.0f} s"
    )
    return per_it, end


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--iterations", type=int, default=10)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--group", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--minibatches", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    if (a.prompts * a.group) % a.minibatches:
        ap.error(f"--prompts x --group = {a.prompts * a.group} answers do not split into {a.minibatches} minibatches")
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())} on {os.cpu_count()} CPUs")
    work = Path(tempfile.mkdtemp(prefix="genloop-rlhf-bench-"))
    ckpt = build(work, a.preset)
    prompts = write_inputs(work, 16)
    g = summary("genloop", *run_genloop(a, ckpt, work))
    print(f"load average after genloop: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    t = summary("TRL", *run_trl(a, ckpt, prompts))
    print(f"load average after TRL: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(
        f"ratio TRL/genloop seconds per iteration = {t[0] / g[0]:.1f}x (goal > 1); mean reward after "
        f"{a.iterations} iterations: genloop {g[1]:.3f} vs TRL {t[1]:.3f}"
    )


if __name__ == "__main__":
    main()

"""GRPO: genloop (vLLM rollout actor + Ray Train learner) vs TRL's ``GRPOTrainer`` (trl==1.16.0, the ``bench``
extra) on the same randomly initialised checkpoint, prompts, group size, reward function and hyper-parameters, on the
same cores. Prints wall seconds per iteration (one generation batch + one optimizer step) and the mean reward of the
last two iterations for each; the LAST line is the ratio TRL / genloop seconds per iteration (goal > 1 at an equal or
better reward).

    python bench/rlhf_bench.py [--preset tiny] [--iterations 10] [--prompts 4] [--group 4] [--max-new-tokens 32]
                               [--lr 5e-3] [--cpus 2]

The task is the tests' toy task with a verifiable reward: the share of an answer's characters that are whitespace.
Both sides: temperature 1, clip eps 0.2, no KL (beta 0), std-normalised group advantages, token-mean loss over the
batch, one epoch / one optimizer step per batch, AdamW (0.9, 0.999), no weight decay, constant lr, grad clip 1.
genloop runs 1 engine (1 CPU) + 1 learner rank (1 CPU) on an embedded Ray with ``--cpus`` CPUs; TRL runs in one
process with ``--cpus`` torch threads (HF ``generate`` for rollouts). Per-iteration time excludes start-up on both
sides (engine / model loading); the total wall of each is printed too.
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
            f.write(json.dumps({"messages": [
                {"role": "user", "content": f"Write a Python function `f{i}(x)` that returns x plus {i}."},
                {"role": "assistant", "content": f"def f{i}(x):\n    return x + {i}"}], "meta": {"task": "write"}}) + "\n")
    (work / "reward.py").write_text(
        "def whitespace(prompts, responses):\n"
        "    return [sum(c in ' \\n' for c in r) / max(1, len(r)) for r in responses]\n")
    return work / "prompts.jsonl"


def run_genloop(a, ckpt: Path, work: Path) -> tuple[list[float], list[float], float]:
    """(seconds per iteration, mean reward per iteration, total wall)."""
    import ray

    from pipelines.config import from_dict
    from pipelines.rlhf.config import RlhfConfig
    from pipelines.rlhf.stage import run

    t0 = time.perf_counter()
    ray.init(num_cpus=a.cpus, include_dashboard=False, log_to_driver=False)
    cfg = from_dict(RlhfConfig, {
        "policy": str(ckpt), "prompts": str(work / "prompts.jsonl"), "out": str(work / "genloop"), "algo": "grpo",
        "reward": f"fn:{work / 'reward.py'}:whitespace", "iterations": a.iterations, "seed": a.seed,
        "rollout": {"engines": 1, "cpus_per_engine": 1, "prompts_per_iter": a.prompts, "group_size": a.group,
                    "sampling": {"max_new_tokens": a.max_new_tokens, "temperature": 1.0},
                    "engine": {"max_model_len": 128, "max_num_seqs": a.prompts * a.group}},
        "update": {"epochs": 1, "minibatches": 1, "eps_low": 0.2, "eps_high": 0.2, "norm_std": True},
        "kl": {"coef": 0.0},
        "train": {"num_workers": 1, "strategy": "none", "cpus_per_worker": max(1, a.cpus - 1),
                  "micro_batch_size": a.prompts * a.group, "lr": a.lr, "grad_clip": 1.0, "ckpt_every": 0}})
    res = run(cfg)
    ray.shutdown()
    return [r["t_iteration"] for r in res.history], [r["reward_mean"] for r in res.history], time.perf_counter() - t0


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

    def reward(prompts, completions, **_):
        return whitespace(prompts, completions)

    class Timer(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []

        def on_step_begin(self, args, state, control, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.times.append(time.perf_counter() - self.t)

    timer = Timer()
    args = GRPOConfig(
        output_dir=str(prompts_file.parent / "trl"), per_device_train_batch_size=a.prompts * a.group,
        num_generations=a.group, max_completion_length=a.max_new_tokens, learning_rate=a.lr, max_steps=a.iterations,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999,
        max_grad_norm=1.0, beta=0.0, epsilon=0.2, num_iterations=1, scale_rewards="group", loss_type="dapo",
        temperature=1.0, top_p=1.0, use_vllm=False, use_cpu=True, bf16=False, fp16=False, logging_steps=1,
        save_strategy="no", report_to="none", seed=a.seed, dataloader_num_workers=0, disable_dropout=True)
    trainer = GRPOTrainer(model=model, reward_funcs=[reward], args=args,
                          train_dataset=Dataset.from_list([{"prompt": t} for t in texts]), processing_class=tok,
                          callbacks=[timer])
    trainer.train()
    rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    return timer.times, rewards, time.perf_counter() - t0


def build(work: Path, preset: str):
    import torch

    from models.checkpoint import save_checkpoint
    from models.tokenizer import train
    from models.transformer import Transformer, model_preset

    files = sorted(glob.glob(str(Path(sysconfig.get_paths()["stdlib"]) / "*.py")))[:60]
    tok = train([Path(f).read_text(errors="replace") for f in files], vocab_size=1024)
    torch.manual_seed(0)
    return save_checkpoint(Transformer(model_preset(preset).for_tokenizer(tok.n_vocab)), tok, work / "policy")


def summary(name: str, times: list[float], rewards: list[float], wall: float) -> tuple[float, float]:
    per_it = statistics.median(times[1:] if len(times) > 1 else times)
    end = sum(rewards[-2:]) / max(1, len(rewards[-2:]))
    print(f"{name:8s} {per_it:.2f} s/iteration (median after the first; first {times[0]:.2f} s), reward "
          f"{rewards[0]:.3f} -> {end:.3f} (mean of the last 2), total wall {wall:.0f} s")
    return per_it, end


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--iterations", type=int, default=10)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--group", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="genloop-rlhf-bench-"))
    ckpt = build(work, a.preset)
    prompts = write_inputs(work, 16)
    g = summary("genloop", *run_genloop(a, ckpt, work))
    t = summary("TRL", *run_trl(a, ckpt, prompts))
    print(f"ratio TRL/genloop seconds per iteration = {t[0] / g[0]:.1f}x (goal > 1); mean reward after "
          f"{a.iterations} iterations: genloop {g[1]:.3f} vs TRL {t[1]:.3f}")


if __name__ == "__main__":
    main()

"""Every ``genloop`` command, in one place, with one convention.

The convention (one module per command, named after its verb; TRL's ``trl/cli/commands`` shape):

- ``cluster/commands/<verb>.py`` defines two functions::

      def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser
          # adds the command's parser; shared options come from ``cluster.commands.base``:
          #   add_stage_command(sub, name, help, flags={...})  -> --config PRESET, key=value overrides,
          #                                                      --overwrite, --address, plus stage flags
          #   add_address(p) / add_overwrite(p)                -> the same options for non-stage commands
      def run(args: argparse.Namespace) -> int
          # the exit code; print() lives here and nowhere below

  ``register`` must not import heavy modules (torch, ray, vllm) at module import time: ``genloop --help`` imports no
  command module at all, and ``genloop X`` imports only ``X``'s.
- A stage command (one with a config section) also defines ``config(args) -> StageConfig``, which returns
  ``config_from_args(ConfigClass, "section", args)``; ``run`` calls it, checks what it can before Ray starts,
  starts Ray with ``start_ray(args)`` (``--address`` / ``RAY_ADDRESS``, else an embedded local Ray), then calls the
  stage's ``run(config)``. Stages take a ready Ray runtime: a stage's ``run(config)`` has no ``address`` parameter
  and never calls ``ray.init`` / ``init_ray``. ``add_stage_command(..., examples="a.b=1 c=2")`` shows override
  examples in ``--help``; tests/test_cli_examples.py builds ``config(args)`` from every example in ``--help`` and
  README.md, so an example that stops working fails the tests.
- Errors a user can fix are raised as ``ValueError`` / ``FileNotFoundError`` / ``ConfigError`` with a message that
  names the problem and what to do; ``cluster.cli.main`` prints them as one line (``GENLOOP_DEBUG=1``: traceback).
- Add the command to ``COMMANDS`` below: (name, module, one-line help). The order is the order in ``--help``.

Imports run one way: models -> pipelines -> serve -> cluster. A command may import anything; nothing below
``cluster`` imports a command.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType


@dataclass(frozen=True)
class Command:
    name: str  # the subcommand as typed: genloop NAME
    module: str  # the module with register() and run()
    help: str  # one line for `genloop --help` (shown without importing the module)

    def load(self) -> ModuleType:
        return importlib.import_module(self.module)


COMMANDS: list[Command] = [
    Command("tokenizer", "cluster.commands.tokenizer", "train a BPE tokenizer (tiktoken format) or inspect one"),
    Command(
        "import-model",
        "cluster.commands.import_model",
        "import a pretrained model (Hugging Face folder, .gguf file, packaged model) as a checkpoint artifact",
    ),
    Command("data", "cluster.commands.data", "clean, deduplicate and tokenize corpora into training blocks (Ray Data)"),
    Command(
        "plan",
        "cluster.commands.plan",
        "estimate a pretraining run: parameters, FLOPs, memory per GPU, fewest GPUs, days and cost",
    ),
    Command(
        "pretrain", "cluster.commands.pretrain", "pretrain or domain-fine-tune the transformer (Ray Train, DDP | FSDP2)"
    ),
    Command("sft-data", "cluster.commands.sft_data", "build an instruction set from a code corpus"),
    Command(
        "tasks",
        "cluster.commands.tasks",
        "generate tasks with reference answers (arithmetic) for verifiable rewards: train + held-out split",
    ),
    Command("sft", "cluster.commands.sft", "instruction fine-tuning (loss on answers only, optional LoRA)"),
    Command(
        "pref-data",
        "cluster.commands.pref_data",
        "preference pairs without humans: sample a policy with vLLM, judge, keep clear margins",
    ),
    Command("reward", "cluster.commands.reward", "train a Bradley-Terry reward model from preference pairs"),
    Command(
        "rlhf", "cluster.commands.rlhf", "align a policy with GRPO or PPO (vLLM rollout actors + Ray Train learner)"
    ),
    Command("dpo", "cluster.commands.dpo", "offline DPO of a checkpoint on preference pairs"),
    Command(
        "eval",
        "cluster.commands.evaluate",
        "compare policies on held-out prompts: reward pass rates with confidence intervals, judge, reward model, KL",
    ),
    Command(
        "serve", "cluster.commands.serve", "serve a checkpoint over OpenAI-compatible HTTP with RAG (Ray Serve + vLLM)"
    ),
    Command(
        "deploy",
        "cluster.commands.deploy",
        "switch a running server to another checkpoint, in place, without a failed request",
    ),
    Command("knowledge", "cluster.commands.knowledge", "add documents to a knowledge store in bulk, or search it"),
    Command(
        "rag-eval",
        "cluster.commands.rag_eval",
        "retrieval quality of a knowledge store: recall@1/5 and MRR, BM25 vs hybrid, on a question set",
    ),
    Command(
        "embed-train",
        "cluster.commands.embed_train",
        "fine-tune a retriever with in-batch-negative InfoNCE on docstring -> code pairs from the corpus",
    ),
    Command("feedback", "cluster.commands.feedback", "export collected user feedback as preference data"),
    Command("lineage", "cluster.commands.lineage", "walk an artifact's inputs back to the raw corpus"),
    Command("submit", "cluster.commands.submit", "submit a genloop command as a Ray job"),
    Command("jobs", "cluster.commands.jobs", "list, inspect, follow or stop Ray jobs"),
    Command("demo", "cluster.commands.demo", "every stage end to end on the embedded corpus (what `make demo` runs)"),
    Command(
        "autoscale-proof",
        "cluster.commands.autoscale_proof",
        "prove autoscaling on a local multi-node Ray: stage-shaped asks add workers, idle ones go",
    ),
]

BY_NAME: dict[str, Command] = {c.name: c for c in COMMANDS}

"""Shared test assets: one Ray instance per session, a tiny tokenizer and a tiny checkpoint built here (no downloads)."""

from __future__ import annotations

import glob
import os
import sysconfig
from pathlib import Path

import pytest

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

STDLIB = Path(sysconfig.get_paths()["stdlib"])


def stdlib_texts(n: int = 60) -> list[str]:
    """A small, deterministic slice of the embedded default corpus."""
    files = sorted(glob.glob(str(STDLIB / "*.py")))[:n]
    return [Path(f).read_text(errors="replace") for f in files]


@pytest.fixture(scope="session")
def ray_session():
    """One embedded Ray for the whole test session (tests that need Ray take this fixture)."""
    import ray

    from cluster.runtime import init_ray

    init_ray(num_cpus=4)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    from models.tokenizer import train

    out = tmp_path_factory.mktemp("tokenizer")
    train(stdlib_texts(), vocab_size=1024).save(out)
    return out


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_tokenizer_dir):
    from models.tokenizer import Tokenizer

    return Tokenizer.load(tiny_tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tiny_tokenizer) -> Path:
    """A randomly initialised `tiny` model saved in Hugging Face format (weights scaled so greedy decoding has no
    near-ties)."""
    import torch

    from models.checkpoint import save_checkpoint
    from models.transformer import Transformer, model_preset

    torch.manual_seed(0)
    model = Transformer(model_preset("tiny").for_tokenizer(tiny_tokenizer.n_vocab))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(5)
    out = tmp_path_factory.mktemp("ckpt") / "tiny"
    save_checkpoint(model, tiny_tokenizer, out)
    return out

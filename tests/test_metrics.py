"""MFU's two halves: the GPU table (one for `genloop plan` and training) matched against real device names, and the
training FLOPs per token (one count for both) against a hand count and against the FLOPs torch really runs."""

from __future__ import annotations

import re
from dataclasses import replace

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from models.scalar_model import ScalarModel
from models.transformer import ModelConfig, Transformer
from pipelines.train import metrics

# torch.cuda.get_device_name() strings as the cards report them (nvidia-smi's names), and Ray's accelerator_type
# labels (ray._private.accelerators.nvidia_gpu: the model token of the same name), for every row of the table
DEVICE_NAMES: dict[str, list[str]] = {
    "h100": ["NVIDIA H100 80GB HBM3", "NVIDIA H100", "H100"],
    "h100-pcie": ["NVIDIA H100 PCIe"],
    "h100-nvl": ["NVIDIA H100 NVL"],
    "h200": ["NVIDIA H200", "H200"],
    "h200-nvl": ["NVIDIA H200 NVL"],
    "a100": ["NVIDIA A100-SXM4-80GB", "NVIDIA A100 80GB PCIe", "A100", "A100-80G"],
    "a100-40gb": ["NVIDIA A100-SXM4-40GB", "NVIDIA A100-PCIE-40GB", "A100-40G"],
    "l4": ["NVIDIA L4", "L4"],
    "b200": ["NVIDIA B200", "B200"],
}
NOT_IN_TABLE = [
    "Tesla T4",
    "Tesla V100-SXM2-16GB",
    "NVIDIA L40S",
    "NVIDIA L40",
    "NVIDIA GB200",
    "NVIDIA GeForce RTX 4090",
    "NVIDIA A10G",
    "NVIDIA H800",
    "",
]


def test_every_row_has_device_names_and_a_sourced_dense_peak():
    assert set(DEVICE_NAMES) == set(metrics.GPUS)  # a new row needs its device names here
    for key, spec in metrics.GPUS.items():
        assert spec.source and spec.device_pattern, key
        assert 1e14 <= spec.peak_flops <= 3e15 and 24e9 <= spec.memory_bytes <= 200e9, key
    # dense bf16 = half the data sheets' sparse figures
    assert metrics.GPUS["h100"].peak_flops == 1979e12 / 2
    assert metrics.GPUS["h100-pcie"].peak_flops == 1513e12 / 2
    assert metrics.GPUS["h100-nvl"].peak_flops == metrics.GPUS["h200-nvl"].peak_flops == 1671e12 / 2
    assert metrics.GPUS["h200"].peak_flops == metrics.GPUS["h100"].peak_flops
    assert metrics.GPUS["a100"].peak_flops == metrics.GPUS["a100-40gb"].peak_flops == 312e12
    assert metrics.GPUS["l4"].peak_flops == 242e12 / 2
    assert metrics.GPUS["b200"].peak_flops == 36e15 / 8 / 2  # HGX B200: 36 PFLOPS sparse over 8 GPUs


@pytest.mark.parametrize("key,name", [(k, n) for k, names in DEVICE_NAMES.items() for n in names])
def test_device_name_finds_exactly_its_row(key, name):
    matches = [k for k, s in metrics.GPUS.items() if re.search(s.device_pattern, name, re.IGNORECASE)]
    assert matches == [key]  # the patterns exclude each other: a variant never takes its base row's peak
    assert metrics.gpu_key_for_device(name) == key
    assert metrics.gpu_peak_flops(name) == metrics.GPUS[key].peak_flops


@pytest.mark.parametrize("name", NOT_IN_TABLE)
def test_other_devices_are_not_guessed(name):
    assert metrics.gpu_key_for_device(name) is None and metrics.gpu_peak_flops(name) is None
    assert metrics.mfu(1e4, 1e9, metrics.gpu_peak_flops(name)) == 0.0


@pytest.mark.parametrize("name,key", [("NVIDIA L4", "l4"), ("NVIDIA B200", "b200"), ("NVIDIA H100 80GB HBM3", "h100")])
def test_training_reads_its_gpu_peak_from_the_table(monkeypatch, name, key):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert metrics.device_peak_flops(torch.device("cuda", 0)) == metrics.GPUS[key].peak_flops


def test_plan_uses_the_same_table():
    from pipelines.pretrain import plan

    assert plan.GPUS is metrics.GPUS and plan.gpu_key_for_device is metrics.gpu_key_for_device
    for key in metrics.GPUS:
        assert plan.gpu_spec(key.upper()) is metrics.GPUS[key]


# ---- FLOPs per token -----------------------------------------------------------------------------------------------
SMALL = ModelConfig(dim=64, n_layers=2, n_heads=2, n_kv_heads=1, ffn_hidden=192, vocab_size=1024, max_seq_len=64)


def test_flops_per_token_by_hand():
    # per block: q 64x64, k and v 64x32 each (1 kv head of 32), o 64x64 -> 64*32*(2*2 + 2*1) = 12,288;
    # gate/up/down 3*64*192 = 36,864; two blocks: 98,304; output projection 64 x 1024 = 65,536 (tied: still a matmul)
    assert SMALL.matmul_params() == 98_304 + 65_536 == 163_840
    assert SMALL.matmul_params(head_out=1) == 98_304 + 64  # a scalar head
    # 6 x 163,840 + attention 12 * 2 layers * 2 heads * 32 * seq 64 = 983,040 + 98,304
    assert SMALL.flops_per_token(64) == 1_081_344
    untied = replace(SMALL, tie_embeddings=False)
    assert untied.flops_per_token(64) == SMALL.flops_per_token(64)  # tying shares the weight, not the work


@pytest.mark.parametrize("model_cls", [Transformer, ScalarModel])
def test_flops_per_token_is_what_torch_runs_in_a_training_step(model_cls):
    """Forward + backward of a genloop model, every matmul counted by torch (SDPA's math kernel: its two T x T
    bmm's per head are counted too, over the whole window as the formula does), equals
    ``model_flops_per_token`` x tokens exactly."""
    torch.manual_seed(0)
    model = model_cls(SMALL)
    batch, seq = 2, 48
    ids = torch.randint(0, SMALL.vocab_size, (batch, seq))
    counter = FlopCounterMode(display=False)
    with sdpa_kernel(SDPBackend.MATH), counter:
        model(ids).float().sum().backward()
    per_token = metrics.model_flops_per_token(model, seq)
    assert counter.get_total_flops() == per_token * batch * seq
    head_out = SMALL.vocab_size if model_cls is Transformer else 1
    assert per_token == SMALL.flops_per_token(seq, head_out=head_out)


def test_mfu_by_hand():
    per_token = metrics.model_flops_per_token(Transformer(SMALL), 64)
    assert per_token == 1_081_344
    # 100,000 tokens/s on one L4: 1.081344e11 FLOP/s of 1.21e14
    assert metrics.mfu(1e5, per_token, metrics.gpu_peak_flops("NVIDIA L4")) == pytest.approx(1.081344e11 / 121e12)
    assert metrics.model_flops_per_token(torch.nn.Linear(4, 4), 64) == 0.0  # no cfg: MFU reads 0

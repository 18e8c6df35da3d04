"""`genloop plan`: parameters, FLOPs and memory against published figures and against what autograd really keeps."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from models.parallel import enable_activation_checkpointing
from models.transformer import ModelConfig, Transformer
from pipelines.config import ConfigError, build_config
from pipelines.data.config import DataConfig
from pipelines.pretrain import plan


def run_shape(config, overrides=None):
    """``plan.run_shape`` with the preset's data section, as ``genloop plan`` builds it."""
    return plan.run_shape(config, overrides, build_config(DataConfig, "data", config))


# GPT-3 175B (Brown et al. 2020, Table 2.1): 96 layers, d_model 12288, 96 heads, context 2048, vocab 50257. Its MLP is
# two d x 4d matrices (8d^2 parameters); genloop's SwiGLU has three d x f matrices, so f = 8d/3 = 32768 gives the
# same parameter count and the same 6N.
GPT3 = ModelConfig(
    dim=12288,
    n_layers=96,
    n_heads=96,
    n_kv_heads=96,
    ffn_hidden=32768,
    vocab_size=50257,
    max_seq_len=2048,
    tie_embeddings=True,
)


def test_gpt3_175b_training_flops_match_the_published_3_14e23():
    assert plan.param_counts(GPT3)["total"] == pytest.approx(175e9, rel=0.005)
    f = plan.training_flops(GPT3, seq_len=2048, tokens=300e9)
    # GPT-3 paper, Appendix D / Table D.1: 3.14e23 training FLOPs for 175B on 300B tokens (6ND with N all 175B
    # parameters, attention left out). genloop's N is the matmul weights: the blocks and the (tied) output projection,
    # which is all of the 175B but the norms, so 6ND lands within 0.1% (the non-embedding N it used before, 0.62B
    # fewer, gave 3.131e23)
    assert f["dense_6nd"] == pytest.approx(3.14e23, rel=0.001)
    assert f["output_head"] == 6 * 12288 * 50257 * 300e9  # 0.6B of the 175B: 0.35% of the 6ND
    assert f["attention"] == pytest.approx(12 * 96 * 12288 * 2048 * 300e9)
    assert f["total"] == pytest.approx(f["dense_6nd"] + f["attention"])
    assert f["attention"] / f["dense_6nd"] < 0.10  # "typically less than 10%" (the same appendix)


def test_flops_per_token_by_hand_and_the_output_projection_counted():
    # dim 64, 2 layers, 2 heads of 32 (1 kv head), ffn 192, vocab 1024, tied embeddings, seq_len 64
    cfg = ModelConfig(dim=64, n_layers=2, n_heads=2, n_kv_heads=1, ffn_hidden=192, vocab_size=1024, max_seq_len=64)
    block = 64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 192  # q, k + v, o, gate/up/down = 49,152
    head = 64 * 1024  # the output projection: tied to the input embedding, still a 64 x 1024 matmul per token
    assert plan.param_counts(cfg)["matmul"] == 2 * block + head == 163_840
    f = plan.training_flops(cfg, seq_len=64, tokens=1000)
    assert f["dense_6nd"] == 6 * 163_840 * 1000
    assert f["output_head"] == 6 * head * 1000  # 40% of this toy's 6ND
    assert f["attention"] == 12 * 2 * 64 * 64 * 1000
    assert f["total"] == 1_081_344 * 1000 == cfg.flops_per_token(64) * 1000
    # llama-8b (Llama 3 8B): 32 blocks of 4096*128*(2*32 + 2*8) + 3*4096*14336 = 218,103,808, and the untied
    # 4096 x 128,256 output projection: 6.2% of the training FLOPs at seq_len 4096 (7.0% of the 6ND) that the
    # non-embedding 6ND left out
    llama = run_shape("llama-8b").model
    assert llama.matmul_params() == 32 * 218_103_808 + 4096 * 128256 == 7_504_658_432
    f = plan.training_flops(llama, seq_len=4096, tokens=1)
    assert f["total"] == 6 * 7_504_658_432 + 12 * 32 * 4096 * 4096 == pytest.approx(5.147e10, rel=1e-4)
    assert f["output_head"] / f["dense_6nd"] == pytest.approx(0.070, abs=0.001)
    # a 135M model with a 49K vocabulary (SmolLM-135M's shape): the tied output projection is a fifth of the 6ND
    small = ModelConfig(
        dim=576, n_layers=30, n_heads=9, n_kv_heads=3, ffn_hidden=1536, vocab_size=49152, max_seq_len=2048
    )
    assert plan.param_counts(small)["total"] == pytest.approx(134.5e6, rel=0.001)
    f = plan.training_flops(small, seq_len=2048, tokens=1)
    assert f["output_head"] / f["dense_6nd"] == pytest.approx(0.21, abs=0.005)


def test_zero_paper_table_1_model_states_16_bytes_per_param():
    # Rajbhandari et al. 2020 (ZeRO), Table 1: 7.5B parameters, mixed-precision Adam: 120 GB on one GPU (DDP
    # baseline); fully sharded (P_os+g+p) over 64 GPUs: 1.88 GB per GPU
    ddp = plan.model_state_bytes(7.5e9, "ddp", 1)
    assert sum(ddp.values()) == pytest.approx(120e9)
    assert sum(plan.model_state_bytes(7.5e9, "ddp", 64).values()) == pytest.approx(120e9)  # DDP does not shard
    fsdp = plan.model_state_bytes(7.5e9, "fsdp", 64)
    assert round(sum(fsdp.values()) / 1e9, 2) == 1.88
    # the same 16 bytes sit inside the full per-GPU estimate
    cfg = GPT3
    mem = plan.memory_per_gpu(cfg, 2048, 1, 64, "fsdp", checkpointing=True)
    n = plan.param_counts(cfg)["total"]
    assert mem["params"] + mem["grads"] + mem["optimizer"] == pytest.approx(16 * n / 64)
    assert mem["total"] == pytest.approx(sum(v for k, v in mem.items() if k != "total"))


def test_llama_8b_preset_has_llama_3_8b_parameter_count():
    shape = run_shape("llama-8b")
    counts = plan.param_counts(shape.model)
    assert counts["total"] == pytest.approx(8.03e9, rel=0.002)  # Llama 3 8B model card: 8.03B
    assert counts["embedding"] == 2 * 128256 * 4096  # untied input and output tables
    assert counts["non_embedding"] + counts["embedding"] == counts["total"]
    assert counts["root"] + 32 * counts["per_block"] == counts["total"]
    assert (shape.seq_len, shape.micro_batch_size, shape.strategy, shape.activation_checkpointing) == (
        4096,
        2,
        "fsdp",
        True,
    )


def _saved_activation_bytes(cfg: ModelConfig, batch: int, seq_len: int, dtype: torch.dtype, ckpt: bool) -> int:
    """Bytes of distinct non-parameter storages autograd saves for backward over one training forward."""
    torch.manual_seed(0)
    model = Transformer(cfg).to(dtype)
    if ckpt:
        enable_activation_checkpointing(model)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen[st.data_ptr()] = st.nbytes()
        return t

    ids = torch.randint(0, cfg.vocab_size, (batch, seq_len))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = model(ids)  # the training loop's loss (pipelines/train/loop.py)
        F.cross_entropy(logits.float().flatten(0, 1), ids.flatten(), reduction="sum")
    return sum(seen.values())


@pytest.mark.parametrize(
    "cfg",
    [
        ModelConfig(dim=256, n_layers=2, n_heads=8, n_kv_heads=2, ffn_hidden=688, vocab_size=1024, max_seq_len=128),
        ModelConfig(dim=192, n_layers=3, n_heads=6, n_kv_heads=6, ffn_hidden=512, vocab_size=2048, max_seq_len=128),
    ],
)
@pytest.mark.parametrize("dtype,act_bytes", [(torch.float32, 4), (torch.bfloat16, 2)])
def test_activation_estimate_matches_what_autograd_saves(cfg, dtype, act_bytes):
    batch, seq = 2, 96
    est = plan.activation_bytes(cfg, seq, batch, act_bytes, checkpointing=False)
    got = _saved_activation_bytes(cfg, batch, seq, dtype, ckpt=False)
    assert est["blocks"] + est["head_saved"] == pytest.approx(got, rel=0.02)
    # checkpointing keeps each block's input; one block's full set comes back at a time in backward
    est_ck = plan.activation_bytes(cfg, seq, batch, act_bytes, checkpointing=True)
    got_ck = _saved_activation_bytes(cfg, batch, seq, dtype, ckpt=True)
    one_layer = plan.layer_activation_bytes_per_token(cfg, act_bytes) * batch * seq
    assert est_ck["blocks"] - one_layer + est_ck["head_saved"] == pytest.approx(got_ck, rel=0.02)
    assert est_ck["blocks"] < est["blocks"]


def test_fewest_gpus_is_the_boundary_of_fitting():
    shape = run_shape("llama-8b")
    cfg, cap = shape.model, 0.9 * plan.GPUS["h100"].memory_bytes
    # 8B x 16 bytes = 128 GB of model states: DDP cannot hold it on an 80 GB GPU
    assert plan.fewest_gpus(cfg, 4096, 2, "ddp", True, cap) is None
    for mb, ckpt in ((2, True), (1, False)):
        w = plan.fewest_gpus(cfg, 4096, mb, "fsdp", ckpt, cap)
        assert w is not None and w >= 2
        assert plan.memory_per_gpu(cfg, 4096, mb, w, "fsdp", ckpt)["total"] <= cap
        assert plan.memory_per_gpu(cfg, 4096, mb, w - 1, "fsdp", ckpt)["total"] > cap
    # the preset's micro-batch of 2 x 4096 tokens without checkpointing: ~56 GB of activations plus ~11 GB of
    # logits and the unsharded working set overflow 72 GB at any world size
    assert plan.fewest_gpus(cfg, 4096, 2, "fsdp", False, cap) is None
    # a small model fits one GPU under DDP
    assert plan.fewest_gpus(run_shape("gpt2-124m").model, 1024, 16, "ddp", False, cap) == 1


def test_plan_for_llama_8b_on_1024_h100s():
    shape = run_shape("llama-8b")
    p = plan.make_plan(shape, plan.PlanConfig(tokens=15e12, gpu="h100", gpus=1024, mfu=0.4, price_per_gpu_hour=2.5))
    flops = shape.model.flops_per_token(4096) * 15e12
    assert p["training_flops"]["total"] == pytest.approx(flops)
    assert p["tokens_per_s"] == pytest.approx(0.4 * 989.5e12 * 1024 / shape.model.flops_per_token(4096))
    assert p["days"] * 86400 * p["tokens_per_s"] == pytest.approx(15e12)
    # GPU-hours x delivered FLOP/s per GPU = the training FLOPs
    assert p["gpu_hours"] * 3600 * 0.4 * 989.5e12 == pytest.approx(flops)
    assert p["cost_usd"] == pytest.approx(p["gpu_hours"] * 2.5)
    assert p["compute_optimal_tokens"] == pytest.approx(20 * p["params"]["total"])
    assert p["fits"] and p["chosen"] == "fsdp_ckpt"
    text = plan.format_plan(p)
    for needle in (
        "parameters:",
        "training FLOPs",
        "FSDP2+ckpt",
        "fewest GPUs",
        "tokens/s",
        "days",
        "GPU-hours",
        "cost: $",
    ):
        assert needle in text
    json.dumps(p)  # JSON-ready


def test_plan_defaults_and_bad_input():
    shape = run_shape("tiny", {"train.num_workers": 2})
    assert shape.model.vocab_size == 1024  # tiny's data stage trains a 1024-token BPE
    p = plan.make_plan(shape, plan.PlanConfig(gpu="a100"))
    assert p["gpus"] == 2 and p["tokens"] == pytest.approx(20 * p["params"]["total"]) and p["cost_usd"] is None
    with pytest.raises(ValueError, match="unknown --gpu"):
        plan.gpu_spec("tpu-v9")
    with pytest.raises(ValueError, match="mfu"):
        plan.make_plan(shape, plan.PlanConfig(mfu=1.5))
    with pytest.raises(ConfigError, match="width"):
        run_shape("tiny", {"model.width": 3})
    with pytest.raises(ConfigError, match="micro_batch_size"):
        run_shape("tiny", {"train.micro_batch_size": "big"})
    assert run_shape("tiny", {"model.n_layers": 6}).model.n_layers == 6
    assert run_shape("tiny", {"model": "llama-1b"}).model.dim == 2048
    assert run_shape("tiny", {"seq_len": 512}).model.max_seq_len == 512


def test_gpu_table_and_device_names():
    # the table is pipelines.train.metrics.GPUS (tests/test_metrics.py matches every row's device names)
    assert plan.gpu_key_for_device("NVIDIA H100 80GB HBM3") == "h100"
    assert plan.gpu_key_for_device("NVIDIA H100 PCIe") == "h100-pcie"
    assert plan.gpu_key_for_device("NVIDIA H200") == "h200"
    assert plan.gpu_key_for_device("NVIDIA A100-SXM4-40GB") == "a100-40gb"
    assert plan.gpu_key_for_device("NVIDIA L4") == "l4" and plan.gpu_key_for_device("NVIDIA B200") == "b200"
    assert plan.gpu_key_for_device("Tesla T4") is None
    for key in ("h100", "h200", "a100", "l4", "b200"):
        spec = plan.gpu_spec(key.upper())
        assert spec.peak_flops > 1e14 and spec.memory_bytes >= 24e9 and spec.source


def test_predict_for_a_cpu_run():
    cfg = ModelConfig(dim=64, n_layers=2, n_heads=2, n_kv_heads=1, ffn_hidden=192, vocab_size=1024, max_seq_len=64)
    out = plan.predict(cfg, seq_len=64, micro_batch=4, world=2, gpu="cpu", strategy="ddp", cpu_threads=1)
    assert out["tokens_per_s"] == pytest.approx(0.4 * out["peak_flops"] * 2 / cfg.flops_per_token(64))
    assert out["memory"]["total"] > 20 * cfg.num_params()  # 16 B/param states + DDP buckets + activations
    fsdp = plan.predict(cfg, seq_len=64, micro_batch=4, world=2, gpu="h100")
    assert fsdp["memory"]["params"] == pytest.approx(4 * cfg.num_params() / 2)


def test_predict_run_and_its_log_line():
    from types import SimpleNamespace

    cfg = ModelConfig(dim=64, n_layers=2, n_heads=2, n_kv_heads=1, ffn_hidden=192, vocab_size=1024, max_seq_len=64)
    tc = SimpleNamespace(
        micro_batch_size=4, num_workers=2, strategy="fsdp", activation_checkpointing=False, cpus_per_worker=1
    )  # the train section's fields predict_run reads
    pred = plan.predict_run(cfg, 64, tc, use_gpu=False)
    assert pred["memory"]["params"] == pytest.approx(4 * cfg.num_params() / 2)  # sharded over the 2 workers
    assert pred["memory"]["activations"] == plan.activation_bytes(cfg, 64, 4, 4, False)["blocks"]  # fp32 on CPU
    line = plan.prediction_summary(pred, tokens_per_s=pred["tokens_per_s"] / 2, peak_memory_bytes=3e9)
    assert "predicted" in line and "(0.50x)" in line and "peak 3.00 GB" in line


def test_plan_command_prints_and_writes_json(tmp_path, capsys):
    import argparse

    from cluster.commands import plan as command

    parser = argparse.ArgumentParser(prog="genloop")
    command.register(parser.add_subparsers(dest="command"))
    out = tmp_path / "plan.json"
    args = parser.parse_args(
        [
            "plan",
            "--config",
            "llama-8b",
            "--tokens",
            "15e12",
            "--gpu",
            "h100",
            "--gpus",
            "1024",
            "--mfu",
            "0.4",
            "--price-per-gpu-hour",
            "2.5",
            "--json",
            str(out),
            "train.micro_batch_size=1",
        ]
    )
    assert command.run(args) == 0
    text = capsys.readouterr().out
    assert "8.03B total" in text and "1024 x NVIDIA H100" in text and "cost: $" in text
    saved = json.loads(out.read_text())
    assert saved["gpus"] == 1024 and saved["run"]["micro_batch_size"] == 1 and saved["tokens"] == 15e12
    with pytest.raises(ConfigError, match="--config"):
        command.run(parser.parse_args(["plan"]))


def test_plan_from_a_checkpoint_uses_its_architecture(tiny_checkpoint):
    from models.checkpoint import load_config

    shape = run_shape("domain", {"init_from": str(tiny_checkpoint), "seq_len": 64})
    assert shape.model == load_config(tiny_checkpoint) and shape.model_name.startswith("checkpoint ")
    assert (shape.micro_batch_size, shape.num_workers, shape.strategy) == (8, 2, "ddp")  # domain's train section
    with pytest.raises(ValueError, match="max_seq_len"):
        run_shape("domain", {"init_from": str(tiny_checkpoint), "seq_len": 100_000})

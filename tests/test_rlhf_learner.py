"""The RLHF learner's tensor work in process (no Ray, strategy none): response positions, one GRPO / PPO update moves
the policy towards the rewarded answers, the KL to a reference used by evaluate_policy."""

import pytest
import torch

from pipelines.rlhf.config import RlhfConfig
from pipelines.rlhf.experience import Experience
from pipelines.rlhf.learner import Learner, collate, logp_and_entropy, response_logits


def make_cfg(policy, algo="grpo", **kl):
    from pipelines.config import from_dict

    return from_dict(
        RlhfConfig,
        {
            "policy": str(policy),
            "prompts": "x",
            "out": "x",
            "reward": "fn:code_judge",
            "algo": algo,
            "rollout": {"prompts_per_iter": 2, "group_size": 2},
            "update": {"epochs": 1, "minibatches": 1, "is_cap": 2.0},
            "kl": kl or {"coef": 0.0},
            "train": {"strategy": "none", "num_workers": 1, "micro_batch_size": 4, "lr": 1e-2, "grad_clip": 0.0},
        },
    )


def test_collate_positions_give_the_log_probs_of_a_plain_forward(tiny_checkpoint):
    from models.checkpoint import load_checkpoint

    model, _ = load_checkpoint(tiny_checkpoint)
    prompts, answers = [[5, 6, 7], [8, 9]], [[10, 11], [12, 13, 14]]
    mb = collate(prompts, answers, pad_id=0, device=torch.device("cpu"))
    logp, _ = logp_and_entropy(response_logits(model, mb), mb.targets)
    assert mb.mask.tolist() == [[1, 1, 0], [1, 1, 1]]
    for i, (p, a) in enumerate(zip(prompts, answers)):
        lsm = torch.log_softmax(model(torch.tensor([p + a]))[0].float(), -1)
        want = [lsm[len(p) - 1 + j, t] for j, t in enumerate(a)]
        assert torch.allclose(logp[i, : len(a)], torch.stack(want), atol=1e-5)


def experience(learner, scores):
    prompts = [[5, 6, 7], [5, 6, 7], [20, 21], [20, 21]]
    answers = [[30, 31, 32], [40, 41], [50, 51, 52, 53], [60]]
    pre = learner._precompute(prompts, answers)
    rollout = [pre["old_logp"][i, : len(a)].tolist() for i, a in enumerate(answers)]  # the engine agrees exactly
    return Experience(prompts, answers, rollout, scores, {"r": scores}, [False] * 4, ["p"] * 4, ["a"] * 4)


def answer_logp(learner, exp):
    pre = learner._precompute(exp.prompt_ids, exp.response_ids)
    return [float(pre["old_logp"][i, : len(a)].sum()) for i, a in enumerate(exp.response_ids)]


@pytest.mark.parametrize("algo", ["grpo", "ppo"])
def test_one_update_moves_the_policy_towards_rewarded_answers(tiny_checkpoint, algo):
    torch.manual_seed(0)
    learner = Learner(make_cfg(tiny_checkpoint, algo), str(tiny_checkpoint), None, torch.device("cpu"))
    exp = experience(learner, [1.0, 0.0, 0.0, 1.0])
    before = answer_logp(learner, exp)
    stats = learner.update(exp, iteration=0)
    after = answer_logp(learner, exp)
    assert after[0] > before[0] and after[3] > before[3]  # rewarded answers more likely
    assert after[1] < before[1] and after[2] < before[2]  # the others less
    assert stats["mismatch_kl"] == pytest.approx(0.0, abs=1e-6) and stats["clip_frac"] == 0.0  # first step: ratio 1
    if algo == "ppo":
        assert stats["value_loss"] > 0


def test_kl_loss_pulls_towards_the_reference_and_is_reported(tiny_checkpoint):
    torch.manual_seed(0)
    cfg = make_cfg(tiny_checkpoint, "grpo", coef=0.5, mode="loss", estimator="k3")
    learner = Learner(cfg, str(tiny_checkpoint), None, torch.device("cpu"))
    exp = experience(learner, [1.0, 0.0, 0.0, 1.0])
    assert learner.update(exp, 0)["kl"] == pytest.approx(0.0, abs=1e-9)  # policy == reference before any step
    assert learner.update(exp, 1)["kl"] > 0
    with pytest.raises(ValueError, match="kl.mode=loss"):
        make_cfg(tiny_checkpoint, "grpo", coef=0.1, mode="reward").validate()


def test_kl_to_reference_is_zero_for_itself_and_positive_for_another_model(tiny_checkpoint, tmp_path):
    from models.checkpoint import load_checkpoint, save_checkpoint
    from pipelines.rlhf.evaluate import kl_to_reference

    model, tok = load_checkpoint(tiny_checkpoint)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.add_(0.05 * torch.randn_like(p))
    save_checkpoint(model, tok, tmp_path / "other")
    prompts, answers = [[5, 6, 7], [8, 9]], [[10, 11], [12, 13, 14]]
    assert kl_to_reference(str(tiny_checkpoint), str(tiny_checkpoint), prompts, answers, 0) == pytest.approx(
        0, abs=1e-6
    )
    assert kl_to_reference(str(tmp_path / "other"), str(tiny_checkpoint), prompts, answers, 0) > 1e-4


# ---- one update on 2 ranks (gloo, torch.distributed without Ray) equals one process -------------------------------
PARITY_PROMPTS = [[5, 6, 7], [20, 21], [9, 8, 7, 6], [30]]
PARITY_ANSWERS = [[30, 31, 32], [40, 41], [50, 51, 52, 53], [60], [61, 62], [70, 71, 72, 73, 74], [80, 81], [90]]


def parity_cfg(policy, algo, strategy, world):
    """8 answers (4 prompts x 2), 2 epochs x 2 minibatches, 1 row per micro-batch: optimizer steps, gradient
    accumulation under no-sync, grad clipping, truncated IS, and the KL term (k3 loss for GRPO, k1 in the reward and
    whitened GAE for PPO) all take part."""
    from pipelines.config import from_dict

    kl = {"coef": 0.1, "mode": "loss", "estimator": "k3"} if algo == "grpo" else {"coef": 0.1, "mode": "reward"}
    cfg = from_dict(
        RlhfConfig,
        {
            "policy": str(policy),
            "prompts": "x",
            "out": "x",
            "reward": "fn:code_judge",
            "algo": algo,
            "rollout": {"prompts_per_iter": 4, "group_size": 2},
            "update": {"epochs": 2, "minibatches": 2, "is_cap": 1.5},
            "kl": kl,
            "train": {"strategy": strategy, "num_workers": world, "micro_batch_size": 1, "lr": 1e-3, "grad_clip": 0.5},
        },
    )
    cfg.validate()
    return cfg


def parity_experience(policy) -> Experience:
    """The parity batch: engine log-probs a little off the learner's (so IS weights are not all 1, some capped)."""
    learner = Learner(parity_cfg(policy, "grpo", "none", 1), str(policy), None, torch.device("cpu"))
    prompts = [PARITY_PROMPTS[i // 2] for i in range(8)]
    pre = learner._precompute(prompts, PARITY_ANSWERS)
    g = torch.Generator().manual_seed(1)
    rollout = [
        (pre["old_logp"][i, : len(a)] + 0.3 * torch.randn(len(a), generator=g)).tolist()
        for i, a in enumerate(PARITY_ANSWERS)
    ]
    scores = [1.0, 0.0, 0.2, 0.9, 0.5, 0.5, 0.0, 0.7]
    return Experience(prompts, PARITY_ANSWERS, rollout, scores, {"r": scores}, [False] * 8, ["p"] * 8, ["a"] * 8)


def one_update(policy, algo, strategy, rank, world, exp):
    """(policy state dict, value state dict or None, stats) after one ``Learner.update`` on this rank."""
    from pipelines.train.state import full_state_dict

    learner = Learner(parity_cfg(policy, algo, strategy, world), str(policy), None, torch.device("cpu"), rank, world)
    stats = learner.update(exp, iteration=0)
    sd = learner.full_state_dict()
    vsd = full_state_dict(learner.value) if learner.value is not None else None
    return sd, vsd, stats


def update_on_ranks(rank, world, port, strategy, policy, exp, out):
    """torch.multiprocessing.spawn target: one gloo rank; rank 0 saves every algo's result to ``out``."""
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = {algo: one_update(policy, algo, strategy, rank, world, exp) for algo in ("grpo", "ppo")}
        if rank == 0:
            torch.save(result, out)
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def assert_same_weights(got, want, what):
    """fp32 tolerance after 4 AdamW steps of lr 1e-3: an element whose gradient is float noise (near 0) can move a few
    percent of one step differently (the summation order differs between 1 and 2 ranks); a wrong minibatch, scale
    or sync moves whole tensors by a step or more (and the stats, grad_norm among them, are compared too)."""
    assert got.keys() == want.keys(), what
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=5e-5, msg=lambda m: f"{what} {k}: {m}")


@pytest.mark.slow
def test_one_update_on_fsdp2_and_ddp_with_two_ranks_equals_one_process(tiny_checkpoint, tmp_path):
    """The same batch, one update (2 epochs x 2 minibatches): FSDP2 x 2 ranks, DDP x 2 ranks and one process give the
    same new policy (and PPO value model) weights, and the same stats, within fp32 tolerance; the weights moved."""
    import torch.multiprocessing as mp

    from models.checkpoint import load_checkpoint

    exp = parity_experience(tiny_checkpoint)
    want = {algo: one_update(tiny_checkpoint, algo, "none", 0, 1, exp) for algo in ("grpo", "ppo")}
    start = load_checkpoint(tiny_checkpoint)[0].state_dict()
    for algo in ("grpo", "ppo"):
        moved = max(float((want[algo][0][k] - start[k]).abs().max()) for k in want[algo][0])
        assert moved > 1e-4, f"{algo}: the update did not change the weights"
        assert 0 < want[algo][2]["is_clip_frac"] < 1 and want[algo][2]["kl"] == pytest.approx(0.0, abs=1e-9)
    for strategy in ("fsdp", "ddp"):
        out = tmp_path / f"{strategy}.pt"
        mp.spawn(update_on_ranks, args=(2, free_port(), strategy, str(tiny_checkpoint), exp, str(out)), nprocs=2)
        got = torch.load(out, weights_only=False)
        for algo in ("grpo", "ppo"):
            sd, vsd, stats = got[algo]
            assert_same_weights(sd, want[algo][0], f"{strategy} x2 {algo} policy")
            if algo == "ppo":
                assert_same_weights(vsd, want[algo][1], f"{strategy} x2 ppo value model")
            for key in (
                "kl",
                "entropy",
                "mismatch_kl",
                "is_clip_frac",
                "clip_frac",
                "policy_loss",
                "grad_norm",
                "value_loss",
            ):
                if key in want[algo][2]:
                    assert stats[key] == pytest.approx(want[algo][2][key], rel=1e-4, abs=1e-7), (
                        f"{strategy} x2 {algo} {key}"
                    )


def test_filtered_group_gets_no_policy_gradient(tiny_checkpoint):
    """update.filter_groups: the second group passes part "r" on both answers, so only another part tells them apart;
    with the filter, the update equals one where that group's scores were equal (zero advantages there)."""
    from dataclasses import replace

    def updated(scores, filter_groups):
        torch.manual_seed(0)
        cfg = make_cfg(tiny_checkpoint)
        cfg.update = replace(cfg.update, filter_groups=filter_groups)
        learner = Learner(cfg, str(tiny_checkpoint), None, torch.device("cpu"))
        exp = experience(learner, scores)
        exp.parts = {"r": [1.0, 0.0, 1.0, 1.0]}
        stats = learner.update(exp, iteration=0)
        return learner.full_state_dict(), stats

    filtered, stats = updated([1.0, 0.0, 1.2, 0.8], "r")
    equal_scores, _ = updated([1.0, 0.0, 1.0, 1.0], "")
    unfiltered, _ = updated([1.0, 0.0, 1.2, 0.8], "")
    assert stats["groups_kept"] == 0.5
    assert all(torch.allclose(filtered[k], equal_scores[k], atol=1e-6) for k in filtered)
    assert any(not torch.allclose(filtered[k], unfiltered[k], atol=1e-6) for k in filtered)


@pytest.mark.parametrize("kl_coef", [0.0, 0.5])
def test_old_log_probs_from_the_training_pass_give_the_two_pass_update(tiny_checkpoint, kl_coef):
    """One epoch of one minibatch: the fused path (old log-probs = the training pass's own, detached) gives the same
    weights and stats as a separate no-grad pass, with an engine whose log-probs differ (importance weights < cap and
    capped)."""
    kl = {"coef": kl_coef, "mode": "loss", "estimator": "k3"} if kl_coef else {}
    runs = []
    for fused in (True, False):
        torch.manual_seed(0)
        learner = Learner(make_cfg(tiny_checkpoint, "grpo", **kl), str(tiny_checkpoint), None, torch.device("cpu"))
        learner.fuse_old_logp = fused
        exp = experience(learner, [1.0, 0.0, 0.0, 1.0])
        exp.rollout_logp = [[v + (0.3 if j % 2 else -1.5) for j, v in enumerate(r)] for r in exp.rollout_logp]
        stats = learner.update(exp, iteration=0)
        runs.append((stats, {k: v.clone() for k, v in learner.base.state_dict().items()}))
    (fused_stats, fused_w), (plain_stats, plain_w) = runs
    assert fused_stats["is_clip_frac"] > 0 and fused_stats["mismatch_kl"] > 0
    for k in ("policy_loss", "grad_norm", "entropy", "mismatch_kl", "is_clip_frac", "kl", "clip_frac"):
        assert fused_stats[k] == pytest.approx(plain_stats[k], rel=1e-5, abs=1e-7), k
    for k in plain_w:
        assert torch.allclose(fused_w[k], plain_w[k], atol=1e-6), k


@pytest.mark.parametrize("algo", ["grpo", "ppo"])
def test_old_log_probs_from_the_engine_give_the_learner_pass_update_when_they_agree(tiny_checkpoint, algo):
    """update.old_logp=rollout over 2 epochs x 2 minibatches: with an engine whose log-probs are the learner's own
    (an fp32 engine), the ratio against them is the ratio against the no-grad pass's, so the weights and the stats
    equal the default's, without that pass. An engine that disagrees changes the update (no IS correction then)."""
    from dataclasses import replace

    def run(old_logp: str, shift: float = 0.0):
        torch.manual_seed(0)
        cfg = make_cfg(tiny_checkpoint, algo)
        cfg.update = replace(cfg.update, epochs=2, minibatches=2, old_logp=old_logp)
        cfg.train = replace(cfg.train, micro_batch_size=1)
        learner = Learner(cfg, str(tiny_checkpoint), None, torch.device("cpu"))
        exp = experience(learner, [1.0, 0.0, 0.0, 1.0])
        exp.rollout_logp = [[v + shift for v in r] for r in exp.rollout_logp]
        calls = []
        pre = learner._precompute
        # (P, R, T, policy): whether the no-grad pass computes the policy's log-probs
        learner._precompute = lambda *a, **k: (
            calls.append(a[3] if len(a) > 3 else k.get("policy", True)) or pre(*a, **k)
        )
        stats = learner.update(exp, iteration=0)
        return stats, learner.full_state_dict(), calls

    learner_stats, learner_w, learner_calls = run("learner")
    rollout_stats, rollout_w, rollout_calls = run("rollout")
    assert learner_calls == [True] and rollout_calls == [False], "no old-log-prob pass with old_logp=rollout"
    for k in learner_w:
        assert torch.allclose(rollout_w[k], learner_w[k], atol=1e-6), k
    for k in ("policy_loss", "grad_norm", "clip_frac"):
        assert rollout_stats[k] == pytest.approx(learner_stats[k], rel=1e-5, abs=1e-7), k
    assert rollout_stats["mismatch_kl"] >= 0.0 and rollout_stats["entropy"] > 0
    _, shifted_w, _ = run("rollout", shift=-0.5)
    assert any(not torch.allclose(shifted_w[k], learner_w[k], atol=1e-6) for k in learner_w)

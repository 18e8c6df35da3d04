"""The RLHF learner's tensor work in process (no Ray, strategy none): response positions, one GRPO / PPO update moves
the policy towards the rewarded answers, the KL to a reference used by evaluate_policy."""

import pytest
import torch

from pipelines.rlhf.config import RlhfConfig
from pipelines.rlhf.experience import Experience
from pipelines.rlhf.learner import Learner, collate, logp_and_entropy, response_logits


def make_cfg(policy, algo="grpo", **kl):
    from pipelines.config import from_dict

    return from_dict(RlhfConfig, {
        "policy": str(policy), "prompts": "x", "out": "x", "reward": "fn:code_judge", "algo": algo,
        "rollout": {"prompts_per_iter": 2, "group_size": 2},
        "update": {"epochs": 1, "minibatches": 1, "is_cap": 2.0},
        "kl": kl or {"coef": 0.0},
        "train": {"strategy": "none", "num_workers": 1, "micro_batch_size": 4, "lr": 1e-2, "grad_clip": 0.0}})


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
        assert torch.allclose(logp[i, :len(a)], torch.stack(want), atol=1e-5)


def experience(learner, scores):
    prompts = [[5, 6, 7], [5, 6, 7], [20, 21], [20, 21]]
    answers = [[30, 31, 32], [40, 41], [50, 51, 52, 53], [60]]
    pre = learner._precompute(prompts, answers)
    rollout = [pre["old_logp"][i, :len(a)].tolist() for i, a in enumerate(answers)]  # the engine agrees exactly
    return Experience(prompts, answers, rollout, scores, {"r": scores}, [False] * 4, ["p"] * 4, ["a"] * 4)


def answer_logp(learner, exp):
    pre = learner._precompute(exp.prompt_ids, exp.response_ids)
    return [float(pre["old_logp"][i, :len(a)].sum()) for i, a in enumerate(exp.response_ids)]


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
    assert kl_to_reference(str(tiny_checkpoint), str(tiny_checkpoint), prompts, answers, 0) == pytest.approx(0, abs=1e-6)
    assert kl_to_reference(str(tmp_path / "other"), str(tiny_checkpoint), prompts, answers, 0) > 1e-4

"""RLHF advantages, KL estimators and losses against values worked out by hand (pipelines/rlhf/algos.py)."""

import math

import pytest
import torch

from pipelines.rlhf import algos


def t(*rows):
    return torch.tensor(rows, dtype=torch.float32)


def test_grpo_group_normalisation_and_dr_grpo_without_std():
    scores = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0])
    mask = t([1, 1], [1, 0], [1, 1], [1, 1], [1, 0], [1, 1])
    adv, ret = algos.grpo_advantages(scores, mask, group_size=2)
    # group [1, 0]: mean .5, unbiased std sqrt(.5) -> +-0.5 / 0.70711; group [2, 2]: all zero
    s = 0.5 / math.sqrt(0.5)
    expect = t([s, s], [-s, 0], [-s, -s], [s, s], [0, 0], [0, 0])
    assert torch.allclose(adv, expect, atol=1e-5)
    assert torch.equal(adv, ret)
    adv_nostd, _ = algos.get_adv_estimator("grpo")(scores, mask, group_size=2, norm_std=False)
    assert torch.allclose(adv_nostd, t([0.5, 0.5], [-0.5, 0], [-0.5, -0.5], [0.5, 0.5], [0, 0], [0, 0]))
    with pytest.raises(ValueError, match="group_size=4"):
        algos.grpo_advantages(scores, mask, group_size=4)


def test_gae_by_hand_with_right_padding():
    rewards = t([0, 0, 1], [0, 1, 0])
    values = t([0.5, 0.6, 0.7], [0.5, 0.6, 9.0])
    mask = t([1, 1, 1], [1, 1, 0])
    adv, ret = algos.get_adv_estimator("gae")(rewards, values, mask, gamma=1.0, lam=0.5)
    # row 0: deltas .3 (last), .1, .1 -> A = [.1 + .5 * .25, .1 + .5 * .3, .3]
    # row 1: the padded token is ignored: deltas .4, .1 -> A = [.1 + .5 * .4, .4, 0]
    assert torch.allclose(adv, t([0.225, 0.25, 0.3], [0.3, 0.4, 0.0]), atol=1e-6)
    assert torch.allclose(ret, t([0.725, 0.85, 1.0], [0.8, 1.0, 0.0]), atol=1e-6)
    adv_g, _ = algos.gae_advantages(t([0, 0, 1]), t([0.0, 0.0, 0.0]), t([1, 1, 1]), gamma=0.5, lam=1.0)
    assert torch.allclose(adv_g, t([0.25, 0.5, 1.0]))  # discounted return of a final reward


def test_clipped_surrogate_asymmetric_eps_and_clip_fraction():
    old = torch.zeros(1, 4)
    ratio = t([1.5, 0.5, 1.1, 1.25])
    adv = t([1.0, 1.0, -1.0, 1.0])
    mask = torch.ones(1, 4)
    loss, st = algos.get_policy_loss("clip")(ratio.log(), old, adv, mask, eps_low=0.2, eps_high=0.3)
    # per token max(-rA, -clip(r)A): -1.3 (clipped at 1.3), -0.5, 1.1, -1.25 (1.25 < 1.3, not clipped)
    assert loss.item() == pytest.approx((-1.3 - 0.5 + 1.1 - 1.25) / 4, abs=1e-6)
    assert st["clip_frac"] == pytest.approx(0.25)
    loss2, st2 = algos.clipped_surrogate(ratio.log(), old, adv, mask, eps_low=0.2, eps_high=0.2)
    assert loss2.item() == pytest.approx((-1.2 - 0.5 + 1.1 - 1.2) / 4, abs=1e-6)
    assert st2["clip_frac"] == pytest.approx(0.5)
    # negative advantage below 1 - eps_low is clipped: max(0.5, 0.8) = 0.8
    loss3, _ = algos.clipped_surrogate(t([0.5]).log(), torch.zeros(1, 1), t([-1.0]), torch.ones(1, 1), 0.2, 0.2)
    assert loss3.item() == pytest.approx(0.8)
    # token-mean over a global token count (data-parallel invariance) and IS weights scale each token
    loss4, _ = algos.clipped_surrogate(
        torch.zeros(1, 2), torch.zeros(1, 2), t([1.0, 1.0]), t([1.0, 0.0]), is_weights=t([0.5, 1.0]), n_tokens=4
    )
    assert loss4.item() == pytest.approx(-0.5 / 4)


def test_clipped_surrogate_gradient_is_zero_where_clipped():
    logp = t([1.5, 0.5]).log().requires_grad_()
    loss, _ = algos.clipped_surrogate(logp, torch.zeros(1, 2), t([1.0, 1.0]), torch.ones(1, 2), 0.2, 0.2)
    loss.backward()
    # token 0 is clipped (no gradient); token 1: d/dlogp of -r A / 2 = -r / 2 = -0.25
    assert torch.allclose(logp.grad, t([0.0, -0.25]))


def test_k1_k3_kl_and_kl_in_reward():
    logp, ref = t([math.log(0.5)]), t([math.log(0.25)])
    assert algos.kl_estimate(logp, ref, "k1").item() == pytest.approx(math.log(2))
    assert algos.kl_estimate(logp, ref, "k3").item() == pytest.approx(0.5 + math.log(2) - 1)
    assert algos.kl_estimate(ref, ref, "k3").item() == 0.0
    with pytest.raises(ValueError, match="k1 or k3"):
        algos.kl_estimate(logp, ref, "k2")
    r = algos.kl_in_reward(torch.tensor([2.0]), t([0.1, 0.2, 0.3]), t([1, 1, 0]), coef=0.5)
    assert torch.allclose(r, t([-0.05, -0.1 + 2.0, 0.0]))


def test_truncated_importance_weights_cap_and_mismatch():
    old = t([math.log(0.4), math.log(0.2), 0.0])
    rollout = t([math.log(0.2), math.log(0.4), 0.0])
    mask = t([1, 1, 0])
    w, st = algos.truncated_is_weights(old, rollout, mask, cap=1.5)
    assert torch.allclose(w, t([1.5, 0.5, 0.0]))  # ratio 2 capped at 1.5; ratio 0.5 kept; padding 0
    assert st["is_clip_frac"] == pytest.approx(0.5)
    # mismatch: k3 of engine vs learner: d = old - rollout = +-log 2 -> (2 - log2 - 1 + 0.5 + log2 - 1) / 2
    assert st["mismatch_kl"] == pytest.approx((2 - math.log(2) - 1 + 0.5 + math.log(2) - 1) / 2)
    w_off, _ = algos.truncated_is_weights(old, rollout, mask, cap=0)
    assert torch.equal(w_off, mask)


def test_value_loss_clip_and_unknown_names():
    v, old, ret = t([1.0, 0.0]), t([0.0, 0.0]), t([0.0, 1.0])
    # token 0: max((1-0)^2, (0.2-0)^2) = 1 -> .5; token 1: max(1, (0-1)^2) = 1 -> .5
    assert algos.value_loss(v, old, ret, torch.ones(1, 2), clip=0.2).item() == pytest.approx(0.5)
    with pytest.raises(ValueError, match="known: gae, grpo"):
        algos.get_adv_estimator("rloo2")
    with pytest.raises(ValueError, match="unknown policy loss"):
        algos.get_policy_loss("nope")


def test_entropy_and_whiten():
    assert algos.entropy_from_logits(torch.zeros(4)).item() == pytest.approx(math.log(4))
    x = t([1.0, 3.0, 100.0])
    w = algos.whiten(x, t([1, 1, 0]))
    assert torch.allclose(w, t([-1.0, 1.0, 0.0]), atol=1e-4)


def test_learner_log_probs_are_those_of_the_tempered_distribution():
    """The learner scores a token under softmax(logits / T), the distribution vLLM sampled it from at temperature T
    (its processed log-probs): two logits 0 and ln 3 at T = 0.5 give probabilities 1/10 and 9/10."""
    from pipelines.rlhf.learner import logp_and_entropy

    logits = torch.tensor([[[0.0, math.log(3.0)]]])  # (m=1, T=1, V=2)
    targets = torch.tensor([[1]])
    logp, ent = logp_and_entropy(logits, targets, temperature=0.5)
    assert logp.item() == pytest.approx(math.log(0.9), abs=1e-6)
    assert ent.item() == pytest.approx(-(0.1 * math.log(0.1) + 0.9 * math.log(0.9)), abs=1e-6)
    logp1, _ = logp_and_entropy(logits, targets)  # temperature 1: 1/4 and 3/4
    assert logp1.item() == pytest.approx(math.log(0.75), abs=1e-6)


def test_informative_groups_keeps_only_groups_with_a_spread():
    """Groups of 3: (0, 1, 0) differs -> kept; (1, 1, 1) all pass and (0, 0, 0) all fail -> dropped."""
    scores = torch.tensor([0.0, 1.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0])
    keep = algos.informative_groups(scores, group_size=3)
    assert keep.tolist() == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="whole groups"):
        algos.informative_groups(scores[:8], group_size=3)


def test_weight_negatives_scales_only_below_mean_answers():
    adv = torch.tensor([[1.5], [-0.5], [0.0], [-1.0]])
    assert algos.weight_negatives(adv, 0.2).flatten().tolist() == pytest.approx([1.5, -0.1, 0.0, -0.2])


def test_pick_groups_prefers_informative_groups_and_keeps_the_batch_size():
    # 4 groups of 3: [uniform, mixed, uniform, mixed]
    keep = algos.informative_groups(torch.tensor([0, 0, 0, 1, 0, 0, 1, 1, 1, 0, 0.5, 0]), 3)
    assert algos.pick_groups(keep, 3, 2) == [1, 3]
    assert algos.pick_groups(keep, 3, 3) == [0, 1, 3]  # too few mixed: the first uniform one fills the batch
    assert algos.pick_groups(keep, 3, 1) == [1]
    assert algos.pick_groups(algos.informative_groups(torch.ones(6), 3), 3, 2) == [0, 1]
    with pytest.raises(ValueError, match="5 groups asked for, 4 sampled"):
        algos.pick_groups(keep, 3, 5)


def test_experience_groups_takes_whole_groups_in_order():
    from pipelines.rlhf.experience import Experience

    n = 6  # 3 groups of 2
    exp = Experience(
        [[i] for i in range(n)],
        [[10 + i] for i in range(n)],
        [[-0.1 * i] for i in range(n)],
        [float(i) for i in range(n)],
        {"p": [float(-i) for i in range(n)]},
        [i == 5 for i in range(n)],
        [f"p{i}" for i in range(n)],
        [f"r{i}" for i in range(n)],
    )
    sub = exp.groups([0, 2], 2)
    assert sub.prompt_ids == [[0], [1], [4], [5]] and sub.response_ids == [[10], [11], [14], [15]]
    assert sub.scores == [0.0, 1.0, 4.0, 5.0] and sub.parts == {"p": [0.0, -1.0, -4.0, -5.0]}
    assert sub.truncated == [False, False, False, True] and sub.response_texts == ["r0", "r1", "r4", "r5"]

"""Preference losses against hand-computed values, and the pair objectives' shapes and counts."""

from __future__ import annotations

import math

import pytest
import torch

from pipelines.prefs.objectives import (
    DPO_LOSSES,
    BradleyTerryObjective,
    DPOObjective,
    bradley_terry_loss,
    dpo_loss,
    sequence_logps,
)


def _softplus(x: float) -> float:  # -log sigmoid(-x) = log(1 + e^x)
    return math.log1p(math.exp(x))


def test_bradley_terry_by_hand():
    rc, rr = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 3.0])
    # -log sigmoid(d) = log(1 + e^-d): d = 1 -> 0.313262, d = -3 -> 3.048587
    assert bradley_terry_loss(rc, rr).tolist() == pytest.approx([0.3132617, 3.0485874], abs=1e-6)
    # a margin is subtracted: d = 1 - 0.5
    assert float(bradley_terry_loss(rc[:1], rr[:1], torch.tensor([0.5]))) == pytest.approx(_softplus(-0.5), abs=1e-6)


def test_dpo_losses_by_hand():
    pc, pr, ref_c, ref_r = (torch.tensor([v]) for v in (-10.0, -12.0, -11.0, -11.0))
    # chosen log-ratio +1, rejected -1: logits 2; beta 0.1 -> beta * logits = 0.2
    loss, rew_c, rew_r = dpo_loss(pc, pr, ref_c, ref_r, beta=0.1)
    assert float(loss) == pytest.approx(_softplus(-0.2), abs=1e-6)  # 0.598139
    assert float(rew_c) == pytest.approx(0.1) and float(rew_r) == pytest.approx(-0.1)
    smooth, _, _ = dpo_loss(pc, pr, ref_c, ref_r, beta=0.1, label_smoothing=0.1)
    assert float(smooth) == pytest.approx(0.9 * _softplus(-0.2) + 0.1 * _softplus(0.2), abs=1e-6)
    ipo, _, _ = dpo_loss(pc, pr, ref_c, ref_r, beta=0.1, kind="ipo")
    assert float(ipo) == pytest.approx((2 - 1 / 0.2) ** 2)  # 9
    hinge, _, _ = dpo_loss(pc, pr, ref_c, ref_r, beta=0.1, kind="hinge")
    assert float(hinge) == pytest.approx(0.8)
    assert set(DPO_LOSSES) == {"sigmoid", "ipo", "hinge"}
    with pytest.raises(ValueError, match="unknown DPO loss 'kto'"):
        dpo_loss(pc, pr, ref_c, ref_r, kind="kto")


def test_dpo_at_the_reference_is_log2():
    same = torch.tensor([-5.0, -7.0])
    loss, rc, rr = dpo_loss(same, same, same, same, beta=0.5)
    assert loss.tolist() == pytest.approx([math.log(2)] * 2) and rc.tolist() == rr.tolist() == [0.0, 0.0]


def test_sequence_logps_sums_labelled_tokens_only():
    logits = torch.zeros(1, 3, 4)  # uniform over 4 tokens
    logits[0, 1, 2] = math.log(3.0)  # position 1: token 2 has p = 3/6
    labels = torch.tensor([[1, 2, -100]])
    assert float(sequence_logps(logits, labels)) == pytest.approx(math.log(0.25) + math.log(0.5))


def test_objectives_count_pairs_and_report_metrics():
    from models.scalar_model import ScalarModel
    from models.transformer import Transformer, model_preset

    cfg = model_preset("tiny").for_tokenizer(100)
    torch.manual_seed(0)
    ids = torch.randint(1, 100, (3, 6))
    ids[:, 4:] = 0  # right padding (pad id 0)
    batch = {"chosen_ids": ids, "rejected_ids": ids.flip(0), "margin": torch.zeros(3)}
    loss, n, m = BradleyTerryObjective(pad_id=0)(ScalarModel(cfg), batch)
    assert int(n) == 3 and loss.shape == () and set(m) == {"accuracy", "margin"} and 0 <= float(m["accuracy"]) <= 3
    labels = torch.where(ids > 0, ids, torch.tensor(-100))
    batch = {"chosen_ids": ids, "rejected_ids": ids.flip(0), "chosen_labels": labels, "rejected_labels": labels.flip(0)}
    policy = Transformer(cfg)
    with torch.no_grad():
        batch["ref_chosen_logp"] = sequence_logps(policy(ids), labels)
        batch["ref_rejected_logp"] = sequence_logps(policy(ids.flip(0)), labels.flip(0))
    loss, n, m = DPOObjective(beta=0.1)(policy, batch)
    assert int(n) == 3 and float(loss) == pytest.approx(3 * math.log(2), abs=1e-4)  # policy == reference
    assert float(m["margin"]) == pytest.approx(0.0, abs=1e-5)
    with pytest.raises(ValueError, match="dpo.beta"):
        DPOObjective(beta=0)


def test_trimming_the_padding_after_every_answer_changes_no_log_prob():
    """Pair rows are padded to seq_len: the columns after the last labelled position of any row are cut before the
    forward pass (a causal model's earlier logits do not read them), and the summed log-probs stay the same."""
    from models.transformer import Transformer, model_preset
    from pipelines.prefs.objectives import trim_to_answers

    cfg = model_preset("tiny").for_tokenizer(100)
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    ids = torch.randint(1, 100, (2, 16))
    ids[0, 7:], ids[1, 5:] = 0, 0  # right padding to 16
    labels = torch.full((2, 16), -100)
    labels[0, 3:6], labels[1, 2:4] = ids[0, 4:7], ids[1, 3:5]  # labels[t] = ids[t + 1] on the answers
    short_ids, short_labels = trim_to_answers(ids, labels)
    assert short_ids.shape == (2, 6) and short_labels.shape == (2, 6)
    with torch.no_grad():
        full = sequence_logps(model(ids), labels)
        cut = sequence_logps(model(short_ids), short_labels)
    assert torch.allclose(full, cut, atol=1e-5)
    assert trim_to_answers(ids, torch.full((2, 16), -100))[0].shape == (2, 1)  # nothing labelled: one column

"""The scalar-head model (reward / value): last non-pad token scoring, built from a causal LM, and transformers'
AutoModelForSequenceClassification loads the saved folder with the same scores."""

from __future__ import annotations

import json

import pytest
import torch

from models.checkpoint import CheckpointError, load_checkpoint
from models.scalar_model import from_causal_lm, last_token_index, load_scalar_model, save_scalar_model, sequence_scores


def test_last_token_index_is_the_rightmost_non_pad_token():
    pad = 0
    ids = torch.tensor([[5, 6, 7, 0, 0], [0, 0, 5, 6, 7], [5, 0, 6, 0, 0], [4, 4, 4, 4, 4]])
    assert last_token_index(ids, pad).tolist() == [2, 4, 2, 4]
    scores = torch.arange(20, dtype=torch.float32).reshape(4, 5)
    assert sequence_scores(scores, ids, pad).tolist() == [2.0, 9.0, 12.0, 19.0]


def test_from_causal_lm_copies_the_trunk_and_has_no_lm_head(tiny_checkpoint):
    lm, tok = load_checkpoint(tiny_checkpoint)
    rm, tok2 = from_causal_lm(tiny_checkpoint)
    assert tok2.n_vocab == tok.n_vocab
    assert "lm_head.weight" not in rm.state_dict() and rm.score.weight.shape == (1, lm.cfg.dim)
    ids = torch.randint(0, tok.n_vocab, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(rm.hidden_states(ids), lm(ids, hidden_only=True))
        assert rm(ids).shape == (2, 9)


def test_saved_folder_loads_in_transformers_with_the_same_scores(tiny_checkpoint, tmp_path):
    from transformers import AutoModelForSequenceClassification

    rm, tok = from_causal_lm(tiny_checkpoint, head_std=1.0)
    out = save_scalar_model(rm, tok, tmp_path / "rm")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForSequenceClassification"] and cfg["num_labels"] == 1
    assert cfg["pad_token_id"] == tok.pad_id
    # right-padded batch of different lengths: the score is read at each row's last real token
    rows = [tok.encode("def f(x):\n    return x"), tok.encode("print(1)")]
    T = max(map(len, rows))
    ids = torch.tensor([r + [tok.pad_id] * (T - len(r)) for r in rows])
    with torch.no_grad():
        ours = sequence_scores(rm(ids), ids, tok.pad_id)
        hf = AutoModelForSequenceClassification.from_pretrained(out, torch_dtype=torch.float32).eval()
        theirs = hf(input_ids=ids).logits.squeeze(-1)
        again, _ = load_scalar_model(out)
        mine_loaded = sequence_scores(again(ids), ids, tok.pad_id)
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(mine_loaded, ours)
    assert abs(float(ours[0] - ours[1])) > 1e-3  # the two rows really score differently


def test_load_scalar_model_refuses_a_causal_lm(tiny_checkpoint):
    with pytest.raises(CheckpointError, match="not a reward/value model"):
        load_scalar_model(tiny_checkpoint)

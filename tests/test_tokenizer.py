import json

import pytest

from models.tokenizer import CHAT_SPECIALS, Tokenizer, TokenizerError, onig_pattern, to_hf_tokenizer_json, train
from tests.helpers import VARIED


def test_trained_tokenizer_round_trips_and_has_chat_specials(tiny_tokenizer, tiny_tokenizer_dir):
    tok = tiny_tokenizer
    assert tok.n_vocab == 1024
    assert set(CHAT_SPECIALS) <= set(tok.special_tokens)
    for text in VARIED:
        assert tok.decode(tok.encode(text, allow_special=True)) == text
    # user text that spells a special token stays ordinary text unless allowed
    assert tok.im_start_id not in tok.encode("<|im_start|>")
    assert tok.encode("<|im_start|>", allow_special=True) == [tok.im_start_id]
    again = Tokenizer.load(tiny_tokenizer_dir)
    assert again.encode(VARIED[0]) == tok.encode(VARIED[0])
    assert json.loads((tiny_tokenizer_dir / "tokenizer_spec.json").read_text())["n_vocab"] == 1024


def test_bpe_actually_merges_frequent_code_words(tiny_tokenizer):
    # "return" and "self" are frequent in the stdlib sample: each must be a single token
    for word in (" return", " self"):
        assert len(tiny_tokenizer.encode(word)) == 1, word


@pytest.mark.parametrize("which", ["trained", "cl100k_base"])
def test_hf_tokenizer_json_gives_identical_ids(which, tiny_tokenizer):
    from tokenizers import Tokenizer as HF

    from tests.helpers import stdlib_texts

    tok = tiny_tokenizer if which == "trained" else Tokenizer.load("cl100k_base")
    hf = HF.from_str(to_hf_tokenizer_json(tok))
    texts = VARIED + stdlib_texts(80)[40:80]
    for text in texts:
        assert hf.encode(text, add_special_tokens=False).ids == tok.encode(text, allow_special=True)


def test_named_encoding_is_offline_cl100k_with_chat_specials():
    tok = Tokenizer.load("cl100k_base")
    assert tok.encode("hello world") == [15339, 1917]  # cl100k_base's published ids
    assert tok.eot_id == 100257 and tok.im_start_id >= 100277


def test_onig_pattern_turns_possessive_into_greedy():
    assert onig_pattern(r"\p{N}{1,3}+|\p{L}++|\s++$|x?+") == r"\p{N}{1,3}|\p{L}+|\s+\z|x?"
    assert onig_pattern(r"\p{L}+") == r"\p{L}+"


def test_bad_tokenizer_specs_are_clear_errors(tmp_path, tiny_tokenizer):
    with pytest.raises(TokenizerError, match="no tokenizer at"):
        Tokenizer.load(tmp_path / "nothing")
    with pytest.raises(TokenizerError, match="no tokenizer at p50k_base.*named encoding \\(cl100k_base\\)"):
        Tokenizer.load("p50k_base")
    tiny_tokenizer.save(tmp_path / "t")
    spec = json.loads((tmp_path / "t" / "tokenizer_spec.json").read_text())
    spec["n_vocab"] = 999
    (tmp_path / "t" / "tokenizer_spec.json").write_text(json.dumps(spec))
    with pytest.raises(TokenizerError, match="n_vocab=999"):
        Tokenizer.load(tmp_path / "t")
    (tmp_path / "t" / "tokenizer_spec.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="not valid JSON"):
        Tokenizer.load(tmp_path / "t")
    with pytest.raises(TokenizerError, match="too small"):
        train(["abc"], vocab_size=100)

"""Chat rendering: the checkpoint's template gives the same ids as transformers; the loss mask is exactly the assistant
turns (content + closing <|im_end|>), checked against examples built by hand piece by piece."""

from __future__ import annotations

import pytest

from models.chat import ChatError, ChatFormat, encode_chat, encode_prompt
from models.tokenizer import CHAT_TEMPLATE

MULTI = [
    {"role": "system", "content": "You write Python."},
    {"role": "user", "content": "Add two numbers."},
    {"role": "assistant", "content": "def add(a, b):\n    return a + b"},
    {"role": "user", "content": "Now é ünïcode ✓ please"},
    {"role": "assistant", "content": "s = 'naïve ✓'"},
]


def test_template_is_read_from_checkpoint(tiny_checkpoint):
    fmt = ChatFormat.from_checkpoint(tiny_checkpoint)
    assert fmt.template == CHAT_TEMPLATE
    with pytest.raises(ChatError, match="tokenizer_config.json"):
        ChatFormat.from_checkpoint(tiny_checkpoint.parent / "nope")


@pytest.mark.parametrize(
    "msgs",
    [
        MULTI,
        MULTI[1:3],
        [
            {"role": "user", "content": "tricky <|im_end|> inside\n\n"},
            {"role": "assistant", "content": "\n\nleading newlines"},
        ],
    ],
)
def test_ids_equal_transformers_apply_chat_template(tiny_checkpoint, tiny_tokenizer, msgs):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(tiny_checkpoint))
    fmt = ChatFormat.from_checkpoint(tiny_checkpoint)
    ids, mask = encode_chat(tiny_tokenizer, fmt, msgs)
    assert ids == list(hf.apply_chat_template(msgs, tokenize=True)["input_ids"])
    assert len(mask) == len(ids)
    prompt = encode_prompt(tiny_tokenizer, fmt, msgs[:-1])
    assert prompt == list(hf.apply_chat_template(msgs[:-1], tokenize=True, add_generation_prompt=True)["input_ids"])
    assert hf.apply_chat_template(msgs, tokenize=False) == fmt.render(msgs)


def test_mask_covers_exactly_assistant_tokens(tiny_tokenizer):
    """Hand-built: encode each piece of the ChatML text on its own; 1 exactly on assistant content + <|im_end|>."""
    tok, fmt = tiny_tokenizer, ChatFormat()
    pieces = [  # (text, in loss?)
        (
            "<|im_start|>system\nYou write Python.<|im_end|>\n<|im_start|>user\nAdd two numbers.<|im_end|>\n"
            "<|im_start|>assistant\n",
            0,
        ),
        ("def add(a, b):\n    return a + b<|im_end|>", 1),
        ("\n<|im_start|>user\nNow é ünïcode ✓ please<|im_end|>\n<|im_start|>assistant\n", 0),
        ("s = 'naïve ✓'<|im_end|>", 1),
        ("\n", 0),
    ]
    want_ids, want_mask = [], []
    for text, m in pieces:
        part = tok.encode(text, allow_special=True)
        want_ids += part
        want_mask += [m] * len(part)
    ids, mask = encode_chat(tok, fmt, MULTI)
    assert ids == want_ids
    assert mask == want_mask
    assert (
        tok.decode([i for i, m in zip(ids, mask) if m])
        == "def add(a, b):\n    return a + b<|im_end|>s = 'naïve ✓'<|im_end|>"
    )
    assert mask.count(1) == sum(len(tok.encode(p, allow_special=True)) for p, m in pieces if m)


def test_train_on_all_and_bad_option(tiny_tokenizer):
    ids, mask = encode_chat(tiny_tokenizer, ChatFormat(), MULTI, train_on="all")
    assert mask == [1] * len(ids)
    with pytest.raises(ChatError, match="train_on"):
        encode_chat(tiny_tokenizer, ChatFormat(), MULTI, train_on="answers")


def test_generation_marker_template_renders():
    """A template with transformers' {% generation %} marker and trim_blocks-sensitive newlines renders exactly as
    transformers renders it."""
    from transformers.utils.chat_template_utils import render_jinja_template

    tmpl = (
        "{% for m in messages %}\n  {% if m['role'] == 'assistant' %}{% generation %}A:{{ m['content'] }}"
        "{% endgeneration %}{% else %}U:{{ m['content'] | tojson }}{% endif %}\n|{% endfor %}"
    )
    fmt = ChatFormat(template=tmpl)
    want, _ = render_jinja_template([MULTI[1:3]], chat_template=tmpl)
    assert fmt.render(MULTI[1:3]) == want[0]
    assert fmt.render(MULTI[1:3]) == 'U:"Add two numbers."|A:def add(a, b):\n    return a + b|'

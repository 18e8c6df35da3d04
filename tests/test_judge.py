"""The code judge: signature parsing from sft-data's prompts and the graded score, on hand-made cases."""

from __future__ import annotations

import pytest

from pipelines.judge import Signature, code_judge, is_trivial, judge, requested_signature
from pipelines.sft.data import WRITE_PROMPTS

SIG = "def clamp(x, lo=0, hi=1) -> int"
GOOD = "def clamp(x, lo=0, hi=1) -> int:\n    return max(lo, min(hi, x))"


@pytest.mark.parametrize("template", WRITE_PROMPTS)
def test_requested_signature_from_every_sft_data_prompt(template):
    prompt = template.format(sig=SIG, doc="Limit `x` to the range [lo, hi].")
    assert requested_signature(prompt) == Signature("clamp", ("x", "lo", "hi"))


def test_requested_signature_forms():
    assert requested_signature("Implement `async def fetch(url, *, timeout=3, **kw)` now") == Signature(
        "fetch", ("url", "timeout", "**kw")
    )
    assert requested_signature("Write `split(s, /, sep, *parts)`.") == Signature("split", ("s", "sep", "*parts"))
    assert requested_signature("What does `x + 1` mean?") is None  # backticks, but no signature
    assert requested_signature("no backticks at all") is None


@pytest.mark.parametrize(
    "response,score",
    [
        ("", 0.0),
        ("def clamp(x, lo=0, hi=1):\n    return (", 0.0),  # does not parse
        ("I cannot do that.", 0.0),
        ("# a comment\nimport os", 0.25),  # parses, defines nothing
        ("def other(x):\n    return x", 0.5),  # a function, not the requested one
        ("def clamp(value):\n    return value", 0.75),  # right name, wrong parameters
        ("def clamp(x, lo=0, hi=1):\n    pass", 0.75),  # right signature, trivial body
        ('def clamp(x, lo, hi):\n    """Clamp."""\n    ...', 0.75),
        ("def clamp(x, lo, hi):\n    raise NotImplementedError()", 0.75),
        (GOOD, 1.0),
        ("Here it is:\n```python\n" + GOOD + "\n```\nDone.", 1.0),  # fenced
        ("```py\nimport math\n\ndef helper(a):\n    return a\n\n" + GOOD + "\n```", 1.0),  # the best function counts
        ("class C:\n    def clamp(x, lo, hi):\n        return x", 1.0),
    ],
)
def test_judge_grades(response, score):
    prompt = WRITE_PROMPTS[0].format(sig=SIG, doc="Limit x to [lo, hi].")
    assert judge(prompt, response) == score


def test_prompt_without_signature_accepts_any_function():
    assert judge("Write something useful.", "def f(a):\n    return a * 2") == 1.0
    assert judge("Write something useful.", "def f(a):\n    pass") == 0.5
    assert judge("Write something useful.", "x = 1") == 0.25


def test_is_trivial():
    import ast

    fn = lambda src: ast.parse(src).body[0]  # noqa: E731
    assert is_trivial(fn("def f():\n    return None"))
    assert is_trivial(fn("def f():\n    'doc'\n    return"))
    assert not is_trivial(fn("def f():\n    return 0"))
    assert not is_trivial(fn("def f(x):\n    x.append(1)"))


def test_code_judge_is_the_batched_form_and_checks_lengths():
    prompt = WRITE_PROMPTS[1].format(sig=SIG, doc="Clamp.")
    assert code_judge([prompt, prompt], [GOOD, "nope("]) == [1.0, 0.0]
    with pytest.raises(ValueError, match="one response per prompt"):
        code_judge([prompt], [])


def test_signature_match_is_dense_and_exact_at_the_top():
    from pipelines.judge import signature_match, signature_similarity

    sig = requested_signature("Implement `def push_token(self, tok)` in Python. Push a token.")
    assert signature_similarity(sig, "def push_token(self, tok):\n    return 1") == 1.0
    # parameters with defaults and annotations count by name; a body that does not parse still counts its def line
    assert signature_similarity(sig, "```python\ndef push_token(self, tok: str = '')\n    x = (") == 1.0
    # "push_tok(self, tok)" vs "push_token(self, tok)": 2 * 19 matched / (19 + 21) characters
    assert signature_similarity(sig, "def push_tok(self, tok):\n    pass") == pytest.approx(38 / 40)
    closer = signature_similarity(sig, "def push_thing(self):\n    pass")
    farther = signature_similarity(sig, "def getate(x):\n    pass")
    assert 0.0 < farther < closer < 1.0
    assert signature_similarity(sig, "x = 1") == 0.0
    assert signature_similarity(None, "def anything(a):\n    pass") == 1.0
    assert signature_match(["Implement `def f(a)`."] * 2, ["def f(a): return a", "no code"]) == [1.0, 0.0]
    with pytest.raises(ValueError, match="1 prompts but 0 responses"):
        signature_match(["p"], [])

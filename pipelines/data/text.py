"""Per-document text steps of the data stage, as plain functions (no Ray): normalise, quality rules, PII redaction.

Two profiles: ``prose`` (Gopher quality + repetition rules and C4 line rules, with the published thresholds as
defaults) and ``code`` (source-file rules: line lengths, alphanumeric share, auto-generated markers, size bounds).
Every rule returns the *name* of the rule that dropped a document (or ``None`` to keep it), so the pipeline can count
and sample what each rule removed.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

# ---- normalise --------------------------------------------------------------------------------------------------

# C0/C1 control characters except tab and newline (carriage returns are folded into newlines first)
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
_TRAILING_WS = re.compile(r"[ \t]+\n")
_MANY_BLANK = re.compile(r"\n{3,}")
_MANY_BLANK_CODE = re.compile(r"\n{4,}")
_INNER_SPACES = re.compile(r"[ \t\u00a0\u2000-\u200a\u3000]+")
_ZERO_WIDTH = re.compile(r"[\u200b\u200c\u200d\u2060\ufeff]")


def normalise(text: str, collapse_spaces: bool) -> str:
    """NFC, CRLF/CR -> LF, no control or zero-width characters, no trailing spaces, at most one blank line in a row.

    ``collapse_spaces`` (prose) also folds runs of spaces/tabs inside a line into one space; code (``False``) keeps
    indentation and up to two blank lines in a row (PEP 8 spacing between top-level definitions).
    """
    text = unicodedata.normalize("NFC", text)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _ZERO_WIDTH.sub("", _CONTROL.sub("", text))
    if collapse_spaces:
        text = "\n".join(_INNER_SPACES.sub(" ", line).strip() for line in text.split("\n"))
    text = _TRAILING_WS.sub("\n", text + "\n")
    if not text.strip():
        return ""
    text = _MANY_BLANK.sub("\n\n", text) if collapse_spaces else _MANY_BLANK_CODE.sub("\n\n\n", text)
    return text.strip("\n") + "\n"


# ---- PII -------------------------------------------------------------------------------------------------------

EMAIL_PLACEHOLDER = "<EMAIL>"
IP_PLACEHOLDER = "<IP_ADDRESS>"
# Patterns are anchored on their rare character ('@', a digit-dot run, ':') so a scan stays linear on source code;
# an e-mail's local part is then extended leftwards by hand instead of by a backtracking regex.
_EMAIL_DOMAIN = re.compile(r"@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
_EMAIL_LOCAL = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._%+-")
_IPV4 = re.compile(r"\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}")
_IPV6 = re.compile(r"[0-9A-Fa-f]{1,4}(?::[0-9A-Fa-f]{1,4}){7}")


def _redact_emails(text: str) -> tuple[str, int]:
    if "@" not in text:
        return text, 0
    out, last, n = [], 0, 0
    for m in _EMAIL_DOMAIN.finditer(text):
        start = m.start()
        while start > last and text[start - 1] in _EMAIL_LOCAL:
            start -= 1
        if start == m.start():  # "@decorator.name": no local part, not an address
            continue
        out += [text[last:start], EMAIL_PLACEHOLDER]
        last, n = m.end(), n + 1
    return "".join(out) + text[last:], n


def _redact_ips(text: str, pattern: re.Pattern, ok: Callable[[str], bool], stop: str) -> tuple[str, int]:
    out, last, n = [], 0, 0
    for m in pattern.finditer(text):
        a, b = m.start(), m.end()
        if (a and text[a - 1] in stop) or (b < len(text) and text[b] in stop) or not ok(m.group()):
            continue
        out += [text[last:a], IP_PLACEHOLDER]
        last, n = b, n + 1
    return ("".join(out) + text[last:], n) if n else (text, 0)


def _ipv4_ok(s: str) -> bool:
    return all(int(p) <= 255 for p in s.split("."))


def redact_pii(text: str) -> tuple[str, int]:
    """E-mail and IP (v4, full-form v6) addresses -> placeholders; returns (text, number of replacements)."""
    text, n_mail = _redact_emails(text)
    text, n_ip4 = _redact_ips(text, _IPV4, _ipv4_ok, "0123456789.")
    n_ip6 = 0
    if text.count(":") >= 7:
        text, n_ip6 = _redact_ips(text, _IPV6, lambda s: True, "0123456789abcdefABCDEF:")
    return text, n_mail + n_ip4 + n_ip6


# ---- rule configs ----------------------------------------------------------------------------------------------


@dataclass
class ProseRules:
    """Gopher (Rae et al. 2021, appendix A) quality + repetition rules and C4 (Raffel et al. 2020) line rules."""

    gopher_quality: bool = True
    min_words: int = 50
    max_words: int = 100_000
    min_mean_word_len: float = 3.0
    max_mean_word_len: float = 10.0
    max_symbol_word_ratio: float = 0.1  # '#' and '...' per word
    max_bullet_lines: float = 0.9  # share of lines starting with a bullet
    max_ellipsis_lines: float = 0.3  # share of lines ending with an ellipsis
    min_alpha_words: float = 0.8  # share of words with an alphabetic character
    min_stop_words: int = 2  # of: the be to of and that have with
    gopher_repetition: bool = True
    max_dup_line_frac: float = 0.30
    max_dup_line_char_frac: float = 0.20
    max_dup_para_frac: float = 0.30
    max_dup_para_char_frac: float = 0.20
    # top n-gram character share, n = 2, 3, 4
    max_top_ngram_char_frac: list[float] = field(default_factory=lambda: [0.20, 0.18, 0.16])
    # duplicated n-gram character share, n = 5 .. 10
    max_dup_ngram_char_frac: list[float] = field(default_factory=lambda: [0.15, 0.14, 0.13, 0.12, 0.11, 0.10])
    c4_lines: bool = True
    c4_min_words_per_line: int = 5  # lines with fewer words are removed
    c4_min_sentences: int = 3  # pages with fewer sentences left are dropped
    c4_drop_curly_brace: bool = True  # pages containing '{' are dropped (code)
    c4_max_word_len: int = 1000  # lines with a longer word are removed


@dataclass
class CodeRules:
    """Source-file rules (in the spirit of The Stack / StarCoder filtering)."""

    enabled: bool = True
    min_chars: int = 50
    max_lines: int = 100_000
    max_line_len: int = 1000
    max_mean_line_len: float = 100.0
    min_alnum_frac: float = 0.25
    autogen_markers: list[str] = field(
        default_factory=lambda: [
            "auto-generated",
            "autogenerated",
            "automatically generated",
            "generated by",
            "generated from",
            "do not edit",
        ]
    )
    autogen_header_lines: int = 5  # markers are looked for in the first N lines


# ---- prose rules -----------------------------------------------------------------------------------------------

_WORD = re.compile(r"\S+")
_STOP_WORDS = frozenset(["the", "be", "to", "of", "and", "that", "have", "with"])
_BULLETS = ("•", "-", "*", "‣", "◦", "⁃", "▪")
_TERMINAL = (".", "!", "?", '"', "'", "”", "’")
_SENTENCE_END = re.compile(r"[.!?]+(?:\s|$)")
_C4_POLICY = ("terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies", "use cookies")


def c4_clean(text: str, r: ProseRules) -> tuple[str, str | None]:
    """C4 line rules: keep lines ending in terminal punctuation with >= N words (and no javascript / policy
    boilerplate); drop pages with 'lorem ipsum', a curly brace, or fewer than N sentences left."""
    low = text.lower()
    if "lorem ipsum" in low:
        return text, "c4_lorem_ipsum"
    if r.c4_drop_curly_brace and "{" in text:
        return text, "c4_curly_brace"
    kept = []
    for line in text.split("\n"):
        s = line.strip()
        words = s.split()
        if not s.endswith(_TERMINAL) or s.endswith("..."):
            continue
        if len(words) < r.c4_min_words_per_line or any(len(w) > r.c4_max_word_len for w in words):
            continue
        ls = s.lower()
        if "javascript" in ls or any(p in ls for p in _C4_POLICY):
            continue
        kept.append(s)
    out = "\n".join(kept)
    if len(_SENTENCE_END.findall(out)) < r.c4_min_sentences:
        return out, "c4_too_few_sentences"
    return out + "\n", None


def gopher_quality(text: str, r: ProseRules) -> str | None:
    words = _WORD.findall(text)
    n = len(words)
    if n < r.min_words:
        return "gopher_too_few_words"
    if n > r.max_words:
        return "gopher_too_many_words"
    mean_len = sum(len(w) for w in words) / n
    if not r.min_mean_word_len <= mean_len <= r.max_mean_word_len:
        return "gopher_mean_word_length"
    if (text.count("#") + text.count("...") + text.count("…")) / n > r.max_symbol_word_ratio:
        return "gopher_symbol_ratio"
    lines = [ln for ln in text.split("\n") if ln.strip()]
    if lines:
        if sum(ln.lstrip().startswith(_BULLETS) for ln in lines) / len(lines) > r.max_bullet_lines:
            return "gopher_bullet_lines"
        if sum(ln.rstrip().endswith(("...", "…")) for ln in lines) / len(lines) > r.max_ellipsis_lines:
            return "gopher_ellipsis_lines"
    if sum(any(c.isalpha() for c in w) for w in words) / n < r.min_alpha_words:
        return "gopher_alpha_words"
    if len(_STOP_WORDS.intersection(w.lower() for w in words)) < r.min_stop_words:
        return "gopher_stop_words"
    return None


def _dup_fracs(items: list[str]) -> tuple[float, float]:
    """(share of items that repeat an earlier one, share of characters in those repeats)."""
    if not items:
        return 0.0, 0.0
    seen: set[str] = set()
    dup_n = dup_chars = 0
    for it in items:
        if it in seen:
            dup_n += 1
            dup_chars += len(it)
        else:
            seen.add(it)
    total_chars = sum(len(it) for it in items) or 1
    return dup_n / len(items), dup_chars / total_chars


def top_ngram_char_frac(words: list[str], n: int) -> float:
    """Characters covered by the most frequent word n-gram (counted once per occurrence) / all word characters."""
    if len(words) < n:
        return 0.0
    grams = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
    gram, count = grams.most_common(1)[0]
    if count < 2:
        return 0.0
    total = sum(len(w) for w in words) or 1
    return sum(len(w) for w in gram) * count / total


def dup_ngram_char_frac(words: list[str], n: int) -> float:
    """Characters of words inside any n-gram that occurs more than once / all word characters (no double counting)."""
    if len(words) < n:
        return 0.0
    first: dict[tuple[str, ...], int] = {}
    covered = [False] * len(words)
    for i in range(len(words) - n + 1):
        g = tuple(words[i : i + n])
        j = first.setdefault(g, i)
        if j != i:
            for k in range(i, i + n):
                covered[k] = True
            for k in range(j, j + n):
                covered[k] = True
    total = sum(len(w) for w in words) or 1
    return sum(len(w) for w, c in zip(words, covered) if c) / total


def gopher_repetition(text: str, r: ProseRules) -> str | None:
    lines = [ln for ln in text.split("\n") if ln.strip()]
    frac, char_frac = _dup_fracs(lines)
    if frac > r.max_dup_line_frac:
        return "gopher_dup_lines"
    if char_frac > r.max_dup_line_char_frac:
        return "gopher_dup_line_chars"
    paras = [p for p in re.split(r"\n\s*\n", text) if p.strip()]
    frac, char_frac = _dup_fracs(paras)
    if frac > r.max_dup_para_frac:
        return "gopher_dup_paragraphs"
    if char_frac > r.max_dup_para_char_frac:
        return "gopher_dup_paragraph_chars"
    words = _WORD.findall(text.lower())
    for n, limit in zip((2, 3, 4), r.max_top_ngram_char_frac):
        if top_ngram_char_frac(words, n) > limit:
            return f"gopher_top_{n}gram"
    for n, limit in zip(range(5, 11), r.max_dup_ngram_char_frac):
        if dup_ngram_char_frac(words, n) > limit:
            return f"gopher_dup_{n}gram"
    return None


def prose_filter(text: str, r: ProseRules) -> tuple[str, str | None]:
    """(possibly line-filtered text, name of the rule that dropped it or None)."""
    if r.c4_lines:
        text, why = c4_clean(text, r)
        if why:
            return text, why
    if r.gopher_quality and (why := gopher_quality(text, r)):
        return text, why
    if r.gopher_repetition and (why := gopher_repetition(text, r)):
        return text, why
    return text, None


# ---- code rules ------------------------------------------------------------------------------------------------


_NON_ALNUM = re.compile(r"[\W_]+")


def code_filter(text: str, r: CodeRules) -> str | None:
    """Name of the code rule that drops ``text``, or None."""
    if not r.enabled:
        return None
    if len(text) < r.min_chars:
        return "code_too_small"
    lines = text.split("\n")
    if len(lines) > r.max_lines:
        return "code_too_many_lines"
    lengths = [len(ln) for ln in lines]
    if max(lengths) > r.max_line_len:
        return "code_long_line"
    if sum(lengths) / len(lines) > r.max_mean_line_len:
        return "code_mean_line_length"
    if len(_NON_ALNUM.sub("", text)) / len(text) < r.min_alnum_frac:
        return "code_alnum_fraction"
    head = "\n".join(lines[: r.autogen_header_lines]).lower()
    if any(m in head for m in r.autogen_markers):
        return "code_autogenerated"
    return None

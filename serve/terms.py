"""Code-aware terms for the lexical index: an identifier is indexed whole and split into its parts.

``json.loads`` -> ``json.loads json loads``; ``TemporaryDirectory`` -> ``temporarydirectory temporary directory``;
``get_HTTPServer2`` -> ``get_httpserver2 get httpserver2 http server 2``; ``b64decode`` -> ``b64decode b 64 decode``.
Splits happen at ``.``, ``_``, lower->Upper case changes, the end of an acronym (``HTTPServer`` -> ``HTTP Server``)
and letter<->digit changes; every term is lower-cased. The FTS5 table that holds these terms keeps ``_`` and ``.``
inside tokens (``tokenchars``), so a whole identifier stays one token there, and questions go through the same
function (``match_query``), so ``json.loads`` in a question matches ``json.loads`` in code exactly and ``loads``
matches it too. Plain words pass through unchanged (``Parse`` -> ``parse``).
"""

from __future__ import annotations

import re

# a word, or dotted words (json.loads, os.path.join); \w includes "_" and Unicode letters
_IDENT = re.compile(r"\w+(?:\.\w+)*", re.UNICODE)
# the parts of one underscore/dot-free piece: acronyms (HTTP before Server), capitalised or lower words, digits
_PART = re.compile(r"[A-Z]+(?=[A-Z][a-z])|[A-Z]?[a-z]+|[A-Z]+|\d+", re.ASCII)
MAX_TERM_CHARS = 64  # longer tokens (hashes, base64 blobs) are dropped whole: they only bloat the index


def split_identifier(ident: str) -> list[str]:
    """The terms of one identifier, the whole (lower-cased) first, then its pieces and their parts, no repeats."""
    whole = ident.lower()
    out = [whole] if len(whole) <= MAX_TERM_CHARS else []
    pieces = [p for p in re.split(r"[._]+", ident) if p]
    for piece in pieces:
        low = piece.lower()
        if low not in out and len(low) <= MAX_TERM_CHARS:
            out.append(low)
        parts = _PART.findall(piece) if piece.isascii() else []  # case rules are ASCII's; other scripts stay whole
        if len(parts) > 1:
            for p in parts:
                p = p.lower()
                if p not in out:
                    out.append(p)
    return out


def code_terms(text: str) -> list[str]:
    """Every term of ``text`` in order (repeats kept: BM25 counts them)."""
    out: list[str] = []
    for m in _IDENT.finditer(text):
        out += split_identifier(m.group())
    return out


def terms_text(text: str) -> str:
    """What the FTS5 table indexes for ``text``: its terms joined by spaces."""
    return " ".join(code_terms(text))


def match_query(text: str, max_terms: int = 48) -> str:
    """A free-text question -> an FTS5 query matching any of its terms (each quoted: no FTS syntax injection)."""
    seen: list[str] = []
    for t in code_terms(text):
        if t not in seen:
            seen.append(t)
            if len(seen) >= max_terms:
                break
    return " OR ".join('"' + t.replace('"', '""') + '"' for t in seen)

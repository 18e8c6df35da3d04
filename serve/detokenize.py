"""Token ids -> text for the wire: incremental detokenisation for streaming (never half a UTF-8 character, never
a prefix of a stop string that may still complete) and token log-probs in OpenAI's shapes (chat and legacy
completions). No Ray, no vLLM."""

from __future__ import annotations

from typing import Any

from models.tokenizer import Tokenizer


class TextStream:
    """Token ids arriving in pieces -> text pieces safe to send: never half a UTF-8 character, never a prefix of a
    stop string that may still complete; stop ids (end of turn) are not part of the text."""

    def __init__(self, tok: Tokenizer, stop_ids: set[int], stops: list[str]) -> None:
        self.tok, self.stop_ids, self.stops = tok, stop_ids, stops
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.ids: list[int] = []
        self.n_generated = 0
        self.sent = 0
        self.text = ""
        self.stopped = False  # a stop string was found: the caller should end the request
        self.lp_ids: list[int] = []  # tokens whose log-probs are not yet taken (take_logprobs), and those log-probs
        self.lps: list = []

    def push(self, new_ids: list[int], logprobs: list | None = None) -> str:
        """The text safe to send after ``new_ids``; ``logprobs`` (one per id, ``models.engine.stream_outputs``) are
        kept for the ids that become text (not stop ids, nothing after a stop string) until ``take_logprobs``."""
        self.n_generated += len(new_ids)
        if self.stopped:
            return ""
        if logprobs is not None:
            for i, lp in zip(new_ids, logprobs):
                if i not in self.stop_ids:
                    self.lp_ids.append(i)
                    self.lps.append(lp)
        self.ids += [i for i in new_ids if i not in self.stop_ids]
        text = self.tok.decode(self.ids)
        for s in self.stops:
            at = text.find(s)
            if at != -1:
                text, self.stopped = text[:at], True
        self.text = text
        safe = len(text) if self.stopped else len(text) - self.hold
        while safe > self.sent and text[safe - 1] == "\ufffd":  # an incomplete multi-byte character
            safe -= 1
        delta = text[self.sent : safe] if safe > self.sent else ""
        self.sent = max(self.sent, safe)
        return delta

    def take_logprobs(self) -> tuple[list[int], list]:
        """(token ids, their log-probs) pushed since the last call."""
        out = (self.lp_ids, self.lps)
        self.lp_ids, self.lps = [], []
        return out

    def flush(self) -> str:
        """What is left to send once generation ended."""
        delta = self.text[self.sent :]
        self.sent = len(self.text)
        return delta


# ---------------------------------------------------------------------------------------------------------------
# log-probs in OpenAI's shapes


def token_piece(tok: Tokenizer, token_id: int) -> tuple[str, list[int]]:
    """A token's text (undecodable bytes of a partial character as U+FFFD, as OpenAI shows them) and its bytes."""
    try:
        raw = tok.enc.decode_single_token_bytes(token_id)
    except KeyError:
        raw = b""
    return raw.decode("utf-8", errors="replace"), list(raw)


def chat_logprobs(tok: Tokenizer, ids: list[int], lps: list) -> list[dict[str, Any]]:
    """``choices[i].logprobs.content`` entries: one per token (``models.engine.stream_outputs`` log-probs)."""
    out = []
    for tid, (lp, top) in zip(ids, lps):
        text, raw = token_piece(tok, tid)
        alts = []
        for t, alp in top:
            at, ab = token_piece(tok, t)
            alts.append({"token": at, "logprob": alp, "bytes": ab})
        out.append({"token": text, "logprob": lp, "bytes": raw, "top_logprobs": alts})
    return out


def completion_logprobs(tok: Tokenizer, ids: list[int], lps: list, offset: int = 0) -> dict[str, list]:
    """``choices[i].logprobs`` of the legacy completions API: tokens, token_logprobs, top_logprobs, text_offset
    (``offset``: the characters already sent before these tokens)."""
    tokens, token_lps, tops, offsets = [], [], [], []
    for tid, (lp, top) in zip(ids, lps):
        text, _ = token_piece(tok, tid)
        tokens.append(text)
        token_lps.append(lp)
        tops.append({token_piece(tok, t)[0]: alp for t, alp in top})
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}

"""One request's answer as it streams in: ``n`` choices, each a ``TextStream`` (stop strings, safe UTF-8 pieces),
its finish reason and log-probs, turned into OpenAI's choice objects for ``chat.completion`` / ``text_completion``
(whole) and their ``.chunk`` deltas (streamed). Plain code the ingress drives; tests drive it without Ray."""

from __future__ import annotations

from typing import Any

from models.tokenizer import Tokenizer
from serve.detokenize import TextStream, chat_logprobs, completion_logprobs

# one choice's progress in one generator piece: (choice index, new text, finish reason or None, token ids, log-probs)
Step = tuple[int, str, "str | None", list[int], list]


class Answer:
    def __init__(
        self,
        tok: Tokenizer,
        stop_ids: list[int],
        stops: list[str],
        n: int,
        chat: bool,
        logprobs: bool,
        copies: bool = False,
    ) -> None:
        """``copies``: the engine makes one sample and every choice is a copy of it (greedy decoding with n > 1)."""
        self.tok, self.chat, self.want_logprobs, self.copies = tok, chat, logprobs, copies
        self.streams = [TextStream(tok, set(stop_ids), stops) for _ in range(n)]
        self.finish: list[str | None] = [None] * n
        self.lp_ids: list[list[int]] = [[] for _ in range(n)]  # every choice's tokens with log-probs (whole answer)
        self.lps: list[list] = [[] for _ in range(n)]
        self.offsets = [0] * n  # completions' text_offset: characters of each choice already covered by log-probs

    @property
    def done(self) -> bool:
        return all(f is not None for f in self.finish)

    @property
    def stopped_early(self) -> bool:
        """A stop string ended a choice: the engine may still be generating it."""
        return any(s.stopped for s in self.streams)

    def push(self, piece: dict[int, tuple[list[int], str | None, list | None]]) -> list[Step]:
        """A generator piece (``serve.generator.Piece``) -> the steps of the choices it moved."""
        steps: list[Step] = []
        if self.copies and 0 in piece:
            piece = {i: piece[0] for i in range(len(self.streams))}
        for i, (ids, fin, lps) in sorted(piece.items()):
            if i >= len(self.streams) or self.finish[i] is not None:
                continue
            st = self.streams[i]
            delta = st.push(ids, lps)
            if st.stopped:
                self.finish[i] = "stop"
            elif fin is not None:
                self.finish[i] = "stop" if fin == "stop" else "length"
            if self.finish[i] is not None:
                delta += st.flush()
            steps.append(self._step(i, delta))
        return steps

    def close(self) -> list[Step]:
        """The engine ended: every choice not finished yet ends as "length" with what is left."""
        steps = []
        for i, st in enumerate(self.streams):
            if self.finish[i] is None:
                self.finish[i] = "length"
                steps.append(self._step(i, st.flush()))
        return steps

    def _step(self, i: int, delta: str) -> Step:
        ids, lps = self.streams[i].take_logprobs()
        self.lp_ids[i] += ids
        self.lps[i] += lps
        return i, delta, self.finish[i], ids, lps

    def logprobs(self, i: int, ids: list[int], lps: list) -> dict | None:
        """The ``logprobs`` object of choice ``i`` for these tokens (None when not asked for)."""
        if not self.want_logprobs:
            return None
        if self.chat:
            return {"content": chat_logprobs(self.tok, ids, lps)}
        out = completion_logprobs(self.tok, ids, lps, self.offsets[i])
        self.offsets[i] += sum(len(t) for t in out["tokens"])
        return out

    # ---- whole answers ----------------------------------------------------------------------------------------------
    def choices(self) -> list[dict[str, Any]]:
        out = []
        for i, st in enumerate(self.streams):
            self.offsets[i] = 0
            c: dict[str, Any] = {
                "index": i,
                "logprobs": self.logprobs(i, self.lp_ids[i], self.lps[i]),
                "finish_reason": self.finish[i] or "length",
            }
            c.update({"message": {"role": "assistant", "content": st.text}} if self.chat else {"text": st.text})
            out.append(c)
        return out

    def texts(self) -> list[str]:
        return [st.text for st in self.streams]

    def n_generated(self) -> int:
        return sum(st.n_generated for st in self.streams)

    # ---- streamed answers -------------------------------------------------------------------------------------------
    def first_chunks(self) -> list[dict[str, Any]]:
        """Chat streams open each choice with its role."""
        if not self.chat:
            return []
        return [
            {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
            for i in range(len(self.streams))
        ]

    def chunk_choices(self, step: Step) -> list[dict[str, Any]]:
        """A step as streamed choices: its text (with its tokens' log-probs), then its finish reason on its own."""
        i, delta, finish, ids, lps = step
        out: list[dict[str, Any]] = []
        lp = self.logprobs(i, ids, lps) if ids else None
        if delta or lp:
            out.append(
                {"index": i, "delta": {"content": delta}, "logprobs": lp, "finish_reason": None}
                if self.chat
                else {"index": i, "text": delta, "logprobs": lp, "finish_reason": None}
            )
        if finish is not None:
            out.append(
                {"index": i, "delta": {}, "logprobs": None, "finish_reason": finish}
                if self.chat
                else {"index": i, "text": "", "logprobs": None, "finish_reason": finish}
            )
        return out

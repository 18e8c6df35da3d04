"""One continuous-learning round against a running server, as a user's client would do it: rate answers and post
preferences through the OpenAI-compatible API (``POST /v1/feedback``), scripted by the code judge.

``serve --smoke`` calls ``feedback_round`` after its questions; ``genloop feedback export --model-version V`` then
writes what the round recorded for the version that answered: the next round's reward-stage input."""

from __future__ import annotations

import logging
from typing import Any

from pipelines.judge import judge, requested_signature, signature_similarity

log = logging.getLogger(__name__)


def _grade(question: str, answer: str) -> tuple[float, float]:
    """(judge score, closeness of the def line to the requested signature): a user's preference, scripted."""
    return judge(question, answer), signature_similarity(requested_signature(question), answer)


def feedback_round(
    client: Any,
    model: str,
    questions: list[str],
    answers: list[dict],
    pairs: int = 2,
    temperature: float = 0.8,
    max_tokens: int | None = None,
) -> dict[str, int]:
    """Rate every answered question that has a response id ('up' when the judge gives it at least the requested
    name, else 'down'), then for the first ``pairs`` questions ask for two sampled answers (``n=2``) and post the
    better one as chosen (judge score, then signature closeness; a tie posts nothing). ``client`` is an
    ``openai.OpenAI``; returns the counts posted."""
    ratings = ups = prefs = 0
    for a in answers:
        if not a.get("response_id"):
            continue
        rating = "up" if judge(a["question"], a["answer"]) >= 0.75 else "down"
        client.post("/feedback", body={"response_id": a["response_id"], "rating": rating}, cast_to=object)
        ratings, ups = ratings + 1, ups + (rating == "up")
    for q in questions[:pairs]:
        extra = {"max_tokens": max_tokens} if max_tokens else {}
        r = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": q}],
            n=2,
            temperature=temperature,
            seed=prefs,
            user="demo-user",
            **extra,
        )
        texts = [c.message.content or "" for c in sorted(r.choices, key=lambda c: c.index)]
        ids = [r.id, f"{r.id}.1"]  # the server records choice i of an n>1 answer as <id>.<i>
        g0, g1 = _grade(q, texts[0]), _grade(q, texts[1])
        if g0 == g1:
            log.info("feedback round: both answers to %r grade %s; no preference posted", q[:60], g0)
            continue
        chosen, rejected = (ids[0], ids[1]) if g0 > g1 else (ids[1], ids[0])
        client.post("/feedback", body={"chosen_id": chosen, "rejected_id": rejected}, cast_to=object)
        prefs += 1
    return {"ratings": ratings, "up": ups, "down": ratings - ups, "preferences": prefs}

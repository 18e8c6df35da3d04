"""Retrieval for RAG: knowledge passages + the asking user's memory facts, and fitting them into the prompt.

``Retriever`` is a plain class (tests call it directly); ``RetrieverServer`` is the Ray Serve deployment around it,
scaled independently of the generator. ``augment`` puts what was retrieved into the last user turn, with each
passage's document id, within a token budget, so prompt + max_tokens still fits the model's context.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

from ray import serve

from models.chat import ChatFormat, encode_prompt
from models.tokenizer import Tokenizer
from serve.knowledge import KnowledgeStore, store_path
from serve.memory import MemoryStore

log = logging.getLogger(__name__)

DOCS_HEADER = "Answer using the documents below; cite the ids you use."
FACTS_HEADER = "What you know about me:"
QUESTION_HEADER = "Question:"


class Retriever:
    """The knowledge store and the memory store behind one object; every method returns plain data."""

    def __init__(
        self,
        knowledge: str | Path,
        memory_db: str | Path,
        chunk_chars: int = 600,
        chunk_overlap: int = 80,
        max_document_chars: int = 200_000,
        embedder: str = "",
        rrf_k: float = 60.0,
        candidates: int = 50,
        reindex: bool = False,
    ) -> None:
        """``embedder``: a ``serve.vectors.load_embedder`` spec; empty: BM25 alone. With one, the vector index is
        loaded, or rebuilt from the store when missing or corrupt, before the first request."""
        from serve.vectors import load_embedder

        self.knowledge = KnowledgeStore(
            knowledge,
            chunk_chars,
            chunk_overlap,
            max_document_chars,
            embedder=load_embedder(embedder),
            rrf_k=rrf_k,
            candidates=candidates,
            reindex=reindex,
        )
        self.memory = MemoryStore(memory_db)
        if self.knowledge.embedder is not None:
            r = self.knowledge.reindex()
            log.info(
                "retriever: vector index of %s: %d vectors (%d embedded now)",
                self.knowledge.embedder.identity,
                r.get("vectors", 0),
                r["embedded"],
            )
        log.info("retriever: %d documents in %s, memory in %s", self.knowledge.count(), self.knowledge.path, memory_db)

    def context(self, query: str, ns: str | None, k_docs: int, k_facts: int) -> dict[str, Any]:
        """``{"passages": [Passage as dict], "facts": [str]}``; facts only for namespace ``ns`` (None: no user).
        Both stores are queried afresh (the vector index catches up with the store first), so a ``knowledge
        sync`` or ``knowledge add`` run by another process shows on the next request."""
        passages = [asdict(p) for p in self.knowledge.search(query, k_docs)] if k_docs > 0 else []
        facts = self.memory.search(ns, query, k_facts) if ns and k_facts > 0 else []
        return {"passages": passages, "facts": facts}

    def embed(self, texts: list[str]) -> dict[str, Any]:
        """``/v1/embeddings`` with ``serve.embeddings_from=retriever``: the knowledge store's embedder
        (``serve.rag_embedder``) on ``texts``: ``{"identity", "vectors": [[float]] (unit rows), "tokens": its
        tokenizer's count, 0 for an embedder without one}``."""
        e = self.knowledge.embedder
        if e is None:
            raise ValueError("the retriever has no embedder: set serve.rag_embedder, or serve.embeddings_from=model")
        tok = getattr(e, "tok", None)
        tokens = sum(len(tok.encode(t)) for t in texts) if tok is not None else 0
        return {"identity": e.identity, "vectors": e.embed(texts).tolist(), "tokens": tokens}

    def add_documents(self, docs: list[dict]) -> list[dict]:
        return [self.knowledge.add(d.get("id"), d["text"], d.get("title")) for d in docs]

    def delete_document(self, doc_id: str) -> bool:
        return self.knowledge.delete(doc_id)

    def get_document(self, doc_id: str) -> dict | None:
        return self.knowledge.get(doc_id)

    def add_fact(self, ns: str, fact: str) -> dict:
        return self.memory.add(ns, fact)

    def list_facts(self, ns: str) -> list[dict]:
        return self.memory.list(ns)

    def delete_fact(self, ns: str, fact_id: str) -> bool:
        return self.memory.delete(ns, fact_id)


def default_memory_db(knowledge: str | Path) -> Path:
    return store_path(knowledge).parent / "memory.db"


def _truncate(tok: Tokenizer, text: str, n_tokens: int) -> str:
    ids = tok.encode(text)
    return text if len(ids) <= n_tokens else tok.decode(ids[:n_tokens]).rstrip("\ufffd") + " ..."


def grounded_turn(question: str, passages: Sequence[dict], facts: Sequence[str]) -> str:
    """The user turn with what was retrieved: the facts about the user, then the instruction and each passage as
    ``[doc id] title`` + its text, then the question last (where a small model looks for what to answer)."""
    parts = []
    if facts:
        parts.append(FACTS_HEADER + "\n" + "\n".join(f"- {f}" for f in facts))
    if passages:
        blocks = "\n\n".join(f"[{d['doc_id']}] {d['title']}\n{d['text']}".rstrip() for d in passages)
        parts.append(DOCS_HEADER + "\n\n" + blocks)
    if not parts:
        return question
    return "\n\n".join(parts) + "\n\n" + QUESTION_HEADER + " " + question


def augment(
    tok: Tokenizer,
    fmt: ChatFormat,
    messages: Sequence[dict],
    passages: Sequence[dict],
    facts: Sequence[str],
    budget: int,
) -> tuple[list[int], list[dict], list[dict], int]:
    """Prompt ids with retrieved context inside the last user turn, at most ``budget`` tokens in all.

    The context goes into the user turn (``grounded_turn``) rendered by the checkpoint's own chat template, not
    into a system message: a template with a default system prompt (SmolLM2, Qwen2) keeps it, and a conversation's
    own system message stays as it was. Returns ``(prompt_ids, messages_used, passages_used, n_facts_used)``. Facts
    go first (they are short and personal), then passages best-first; a passage that does not fit whole is cut to
    the room left (at least 8 tokens, else dropped). Without a user turn, or without room for anything, the plain
    conversation is returned.
    """
    base = list(messages)
    plain_ids = encode_prompt(tok, fmt, base)
    last = next((i for i in range(len(base) - 1, -1, -1) if base[i]["role"] == "user"), None)
    if last is None:
        return plain_ids, base, [], 0
    facts_used: list[str] = []
    docs_used: list[dict] = []

    def build(fs: list[str], ds: list[dict]) -> list[dict]:
        if not fs and not ds:
            return base
        turn = dict(base[last], content=grounded_turn(base[last]["content"], ds, fs))
        return base[:last] + [turn] + base[last + 1 :]

    def size(fs: list[str], ds: list[dict]) -> int:
        return len(encode_prompt(tok, fmt, build(fs, ds)))

    for f in facts:
        if size(facts_used + [f], docs_used) <= budget:
            facts_used.append(f)
    for p in passages:
        if size(facts_used, docs_used + [p]) <= budget:
            docs_used.append(p)
            continue
        room = budget - size(facts_used, docs_used + [dict(p, text="")])
        if room >= 8:
            cut = dict(p, text=_truncate(tok, p["text"], room - 2))
            while size(facts_used, docs_used + [cut]) > budget and room >= 8:
                room -= 4
                cut = dict(p, text=_truncate(tok, p["text"], room - 2))
            if room >= 8:
                docs_used.append(cut)
        break  # later passages are less relevant than the one that no longer fit
    if not facts_used and not docs_used:
        return plain_ids, base, [], 0
    used = build(facts_used, docs_used)
    return encode_prompt(tok, fmt, used), used, docs_used, len(facts_used)


@serve.deployment(name="Retriever")
class RetrieverServer(Retriever):
    """The retriever as a Ray Serve deployment: its own replicas, scaled apart from the generator. The SQLite files
    live on the replica's node; run one replica per store file (or put the store on a shared filesystem)."""

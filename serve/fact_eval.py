"""Invented facts and answer accuracy with RAG on vs off (``genloop rag-eval --facts N --model URL_OR_CKPT``).

``invented_facts`` makes facts no model can know, deterministic from a seed: invented names, places and numbers
("The Velmora Accord was signed in the town of Questbridge in 1873."), each with its question ("In which town was
the Velmora Accord signed?") and answer ("Questbridge"), plus distractor documents: for every fact one about the same
invented subject that answers another question ("The Velmora Accord was drafted by ..."), and facts of the same
kinds about other invented subjects that no question asks about. Names are made of syllables, never repeated in a
set, so they are words no corpus holds; no answer appears in its question.

``answer_accuracy`` asks every question twice through an answer function (RAG on, RAG off) and counts an answer
right when it contains the expected string (case-insensitive); each count comes with its Wilson 95% interval.
``served_answerer`` asks a ``genloop serve`` over HTTP (``rag: true|false``; the retrieved ids come from
``rag.documents``) and ``post_documents`` puts the facts into its store; ``local_answerer`` runs a checkpoint with
transformers (greedy) on a local store, with the serving prompt builder (``serve.retriever.augment``).

Measured once (SmolLM2-135M-Instruct imported with ``genloop import-model smollm2-135m-instruct --out runs/smollm2``;
30 facts of seed 0 + 90 distractor documents; greedy, 32 tokens; 2 shared CPU cores):

- served: ``genloop serve --model runs/smollm2 --model-name smollm2 --knowledge runs/facts-served --port 8731``,
  then ``genloop rag-eval --store runs/facts-served-local --facts 30 --seed 0 --k 3 --model http://127.0.0.1:8731
  --max-tokens 32 --show-misses 10`` (the facts POSTed, BM25 top 3 by the server): RAG on 24/30 = 0.800 (Wilson 95%
  0.627-0.905), the fact's document in the prompt 30/30; RAG off 0/30 (0-0.114). Of the 6 misses, 4 answer with a
  name from another document in the prompt, 1 miscopies the name (Fendel for Fendor), 1 does not answer.
- run here: ``genloop rag-eval --store runs/facts --facts 30 --seed 0 --model runs/smollm2 --max-tokens 32``
  (transformers, BM25 top 5): RAG on 25/30 = 0.833 (0.664-0.927), document in the prompt 30/30; RAG off 0/30.
"""

from __future__ import annotations

import logging
import random
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

log = logging.getLogger(__name__)

SYLLABLES = (
    "vel mor ka quest bri dra zen tor lin bel ost fa rin gal sha ven dor mi ra thal cor vin esk ul brom "
    "tav nir ope sel kon dru has pel yar ith gor wen lus tar fen kel"
).split()
TOWN_ENDS = ("bridge", "ford", "haven", "mere", "wick", "stead", "holm", "by")
FIRST = ("Ilsa", "Tomas", "Mirel", "Oskar", "Fenna", "Arvid", "Liesl", "Corin", "Senna", "Jorun", "Edda", "Pavo")
BIRDS = ("finch", "heron", "plover", "lark", "crane", "warbler")

# one kind of fact: its text, question, answer and a second text about the same subject (the sibling distractor)
KINDS = (
    "accord",
    "river",
    "guild",
    "tower",
    "island",
    "bird",
)


@dataclass
class FactSet:
    """Documents (``{"id", "title", "text"}``) and questions (``{"question", "doc", "answer"}``)."""

    documents: list[dict] = field(default_factory=list)
    questions: list[dict] = field(default_factory=list)


class _Names:
    """Invented words from syllables, never the same twice in one set."""

    def __init__(self, rng: random.Random) -> None:
        self.rng, self.used = rng, set()

    def word(self, n: int = 0, end: str = "") -> str:
        while True:
            k = n or self.rng.choice((2, 3))
            w = ("".join(self.rng.sample(SYLLABLES, k)) + end).capitalize()
            if w.lower() not in self.used and 5 <= len(w) <= 14:
                self.used.add(w.lower())
                return w

    def person(self) -> str:
        return f"{self.rng.choice(FIRST)} {self.word(2)}"


def _fact(kind: str, nm: _Names, rng: random.Random) -> tuple[str, str, str, str, str]:
    """(title, text, question, answer, sibling text) of one invented fact."""
    if kind == "accord":
        name, town, year = nm.word(), nm.word(2, rng.choice(TOWN_ENDS)), rng.randint(1610, 1890)
        return (
            f"{name} Accord",
            f"The {name} Accord was signed in the town of {town} in {year}.",
            f"In which town was the {name} Accord signed?",
            town,
            f"The {name} Accord was drafted by {nm.person()} and has {rng.randint(9, 60)} articles.",
        )
    if kind == "river":
        name, lake = nm.word(), nm.word()
        return (
            f"{name} River",
            f"The {name} River is {rng.randint(40, 900)} kilometres long and flows into Lake {lake}.",
            f"Into which lake does the {name} River flow?",
            lake,
            f"The {name} River rises in the hills above {nm.word(2, rng.choice(TOWN_ENDS))}.",
        )
    if kind == "guild":
        place, person = nm.word(), nm.person()
        return (
            f"{place} Guild of Brewers",
            f"The chief brewer of the {place} Guild of Brewers is {person}, who has held the post since "
            f"{rng.randint(1950, 2020)}.",
            f"Who is the chief brewer of the {place} Guild of Brewers?",
            person.split()[1],
            f"The {place} Guild of Brewers meets every spring in the hall of {nm.word()} Street.",
        )
    if kind == "tower":
        name, height = nm.word(), rng.randint(113, 987)
        return (
            f"{name} Tower",
            f"The {name} Tower is {height} metres tall and was finished in {rng.randint(1900, 2015)}.",
            f"How tall is the {name} Tower, in metres?",
            str(height),
            f"The {name} Tower was designed by the architect {nm.person()}.",
        )
    if kind == "island":
        name, capital = nm.word(), nm.word(2, rng.choice(TOWN_ENDS))
        return (
            f"{name} Island",
            f"The capital of {name} Island is {capital}, a harbour town of {rng.randint(2, 90)} thousand people.",
            f"What is the capital of {name} Island?",
            capital,
            f"{name} Island lies {rng.randint(20, 400)} kilometres off the coast and is known for its wool.",
        )
    if kind == "bird":
        country, bird = nm.word(), nm.word(2)
        species = f"{bird} {rng.choice(BIRDS)}"
        return (
            f"Birds of {country}",
            f"The national bird of {country} is the {species}, which nests on the cliffs of the north coast.",
            f"What is the national bird of {country}?",
            bird,
            f"{country} adopted its flag, three green bands on white, in {rng.randint(1800, 1990)}.",
        )
    raise ValueError(f"unknown kind {kind!r}")


def invented_facts(n: int, seed: int = 0, distractors: int | None = None) -> FactSet:
    """``n`` invented facts with their questions, each with a sibling distractor (same subject, another fact),
    plus ``distractors`` (default ``n``) more facts about other subjects that no question asks about. Documents
    are shuffled; ids (``fact-<seed>-<number>``) say nothing about which document answers what."""
    if n < 1:
        raise ValueError(f"need at least one fact, got {n}")
    rng = random.Random(seed)
    nm = _Names(rng)
    extra = n if distractors is None else distractors
    docs: list[dict] = []
    questions: list[tuple[int, dict]] = []
    for i in range(n + extra):
        kind = KINDS[i % len(KINDS)]
        title, text, question, answer, sibling = _fact(kind, nm, rng)
        docs.append({"title": title, "text": text, "_q": (i, question, answer) if i < n else None})
        docs.append({"title": title, "text": sibling, "_q": None})
    rng.shuffle(docs)
    out = FactSet()
    for j, d in enumerate(docs):
        doc_id = f"fact-{seed}-{j:04d}"
        out.documents.append({"id": doc_id, "title": d["title"], "text": d["text"]})
        if d["_q"]:
            questions.append((d["_q"][0], {"question": d["_q"][1], "doc": doc_id, "answer": d["_q"][2]}))
    out.questions = [q for _, q in sorted(questions, key=lambda x: x[0])]  # in the order they were made
    return out


def wilson(k: int, n: int) -> tuple[float, float, float]:
    from pipelines.rlhf.evaluate import wilson_interval

    return wilson_interval(k, n)


def is_right(response: str, answer: str) -> bool:
    return answer.casefold() in response.casefold()


# an answer function: (question, rag on?) -> (the model's answer, ids of the documents put in its prompt)
Answerer = Callable[[str, bool], "tuple[str, list[str]]"]


def answer_accuracy(questions: Sequence[dict], answer: Answerer, show: int = 0) -> dict[str, Any]:
    """``{"rag_on": {...}, "rag_off": {...}}``, each ``k`` right of ``n``, ``accuracy`` with Wilson ``lo``/``hi``,
    ``retrieved`` (RAG on: questions whose expected document was in the prompt) and ``misses`` (question, expected
    answer, response); ``samples``: the first ``show`` questions with both answers."""
    qs = [q for q in questions if q.get("answer")]
    if not qs:
        raise ValueError('no question has an "answer" string to check')
    out: dict[str, Any] = {}
    samples: list[dict] = []
    for mode, rag in (("rag_on", True), ("rag_off", False)):
        k = found = 0
        misses: list[dict] = []
        for i, q in enumerate(qs):
            text, ids = answer(q["question"], rag)
            right = is_right(text, q["answer"])
            k += right
            if not right:
                misses.append({"question": q["question"], "answer": q["answer"], "response": text})
            found += q["doc"] in ids
            if (i + 1) % 10 == 0 or i + 1 == len(qs):
                log.info("%s: %d/%d questions asked, %d right", mode, i + 1, len(qs), k)
            if i < show:
                if mode == "rag_on":
                    samples.append({"question": q["question"], "answer": q["answer"]})
                samples[i][mode] = text
        p, lo, hi = wilson(k, len(qs))
        out[mode] = {"k": k, "n": len(qs), "accuracy": p, "lo": lo, "hi": hi, "retrieved": found, "misses": misses}
    out["samples"] = samples
    return out


def format_accuracy(res: dict[str, Any]) -> list[str]:
    """The side-by-side lines ``rag-eval`` prints."""
    lines = [f"{'answers (contain the fact)':34s} {'right':>9s} {'accuracy':>9s}   Wilson 95%   doc in prompt"]
    for mode, name in (("rag_on", "RAG on"), ("rag_off", "RAG off")):
        r = res[mode]
        lines.append(
            f"{name:34s} {r['k']:>4d}/{r['n']:<4d} {r['accuracy']:9.3f}   [{r['lo']:.3f}, {r['hi']:.3f}]"
            f"   {r['retrieved']}/{r['n']}"
        )
    return lines


# ---- a served model ---------------------------------------------------------------------------------------------
def _base(url: str) -> str:
    url = url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


def _headers(api_key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def _check(r) -> dict:
    if r.status_code != 200:
        raise RuntimeError(f"{r.request.method} {r.request.url} answered {r.status_code}: {r.text[:300]}")
    return r.json()


def post_documents(url: str, docs: Sequence[dict], api_key: str = "", batch: int = 32) -> int:
    """``POST /v1/documents`` in batches (an id already there is replaced); returns the documents added."""
    import httpx

    n = 0
    for i in range(0, len(docs), batch):
        r = httpx.post(
            _base(url) + "/v1/documents",
            json={"documents": list(docs[i : i + batch])},
            headers=_headers(api_key),
            timeout=120,
        )
        n += len(_check(r)["data"])
    return n


def served_answerer(url: str, api_key: str = "", max_tokens: int = 48, model: str | None = None) -> Answerer:
    """Ask a ``genloop serve`` (greedy): RAG on is the server's retrieval (``rag: true``), its ids from
    ``rag.documents``."""
    import httpx

    base, headers = _base(url), _headers(api_key)
    if model is None:
        model = _check(httpx.get(base + "/v1/models", headers=headers, timeout=60))["data"][0]["id"]
    client = httpx.Client(timeout=300, headers=headers)

    def answer(question: str, rag: bool) -> tuple[str, list[str]]:
        body = {
            "model": model,
            "messages": [{"role": "user", "content": question}],
            "max_tokens": max_tokens,
            "temperature": 0.0,
            "rag": rag,
        }
        out = _check(client.post(base + "/v1/chat/completions", json=body))
        return out["choices"][0]["message"]["content"], [d["id"] for d in out.get("rag", {}).get("documents", [])]

    return answer


# ---- a checkpoint run here ---------------------------------------------------------------------------------------
def local_answerer(ckpt: str, store, k: int = 5, max_tokens: int = 48) -> Answerer:
    """Run a checkpoint with transformers (greedy, float32 on CPU) on prompts built as serving builds them: the
    store's ``k`` best passages in the user turn (``serve.retriever.augment``) within the model's context."""
    import torch
    from transformers import AutoModelForCausalLM

    from models.chat import ChatFormat, encode_prompt
    from models.checkpoint import load_tokenizer
    from pipelines.artifacts import checkpoint_dir
    from serve.retriever import augment

    local = checkpoint_dir(ckpt)
    tok, fmt = load_tokenizer(local), ChatFormat.from_checkpoint(local)
    model = AutoModelForCausalLM.from_pretrained(str(local), dtype=torch.float32).eval()
    context = int(getattr(model.config, "max_position_embeddings", 2048))
    stop = [i for i in {tok.eot_id, tok.im_end_id} if i is not None]

    def answer(question: str, rag: bool) -> tuple[str, list[str]]:
        messages = [{"role": "user", "content": question}]
        ids, docs = encode_prompt(tok, fmt, messages), []
        if rag:
            passages = [asdict(p) for p in store.search(question, k)]
            ids, _, docs, _ = augment(tok, fmt, messages, passages, [], context - max_tokens)
        with torch.no_grad():
            out = model.generate(
                torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=max_tokens,
                do_sample=False,
                eos_token_id=stop,
                pad_token_id=stop[0],
            )
        new = [t for t in out[0, len(ids) :].tolist() if t not in stop]
        return tok.decode(new), [d["doc_id"] for d in docs]

    return answer

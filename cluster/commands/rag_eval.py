"""``genloop rag-eval --store DIR --questions FILE [--k 5] [--embedder SPEC]``: recall@1, recall@k and MRR of the
knowledge store's retrieval, BM25 alone vs dense alone vs hybrid (RRF), side by side on one question set (no Ray).

``--build-stdlib`` first fills ``--store`` with the standard library's sources (the embedded corpus, ids
``stdlib/<path>``; skipped when the store already holds documents); ``--write-questions FILE`` writes the rule-made
question set from the standard library's module docstrings (``serve.rag_eval``; the repo ships it as
``configs/rag/stdlib_questions.jsonl``) and exits.

Answers (``serve.fact_eval``): ``--facts N [--seed S]`` makes N invented facts (with distractor documents) the
question set and adds their documents to ``--store``; ``--model URL_OR_CKPT`` then asks every question with RAG on
and off and prints answer accuracy (the expected string in the answer) as k/n with Wilson 95% intervals. A URL is a
running ``genloop serve`` (the facts are POSTed to its ``/v1/documents`` first, so the served store holds them); a
checkpoint runs here with transformers on ``--store``, with the serving prompt builder.
"""

from __future__ import annotations

import argparse
import json
import os
import time

HELP = "retrieval quality of a knowledge store: recall@1/k and MRR, BM25 vs hybrid, on a question set"
DEFAULT_QUESTIONS = "configs/rag/stdlib_questions.jsonl"


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("rag-eval", help=HELP, description=HELP, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--store", default="runs/rag-eval", help="a .db file or a folder holding knowledge.db")
    p.add_argument(
        "--questions",
        default=DEFAULT_QUESTIONS,
        help='JSONL: {"question": ..., "doc": expected document id, "answer": optional}',
    )
    p.add_argument("--k", type=int, default=5, help="recall@k (recall@1 is always shown)")
    p.add_argument("--depth", type=int, default=50, help="chunks ranked per question (MRR is 0 below them)")
    p.add_argument("--embedder", default="", help="hash:DIM, lsa:DIR or ckpt:DIR (serve.vectors); empty: BM25 alone")
    p.add_argument("--rrf-k", type=float, default=60.0, help="reciprocal rank fusion constant (1-based ranks)")
    p.add_argument("--candidates", type=int, default=50, help="chunks from each side before fusion")
    p.add_argument("--reindex", action="store_true", help="re-embed a store indexed for another embedder")
    p.add_argument(
        "--build-stdlib",
        action="store_true",
        help="fill --store with the standard library's sources first (when it is empty)",
    )
    p.add_argument(
        "--write-questions",
        metavar="FILE",
        default=None,
        help="write the rule-made stdlib question set to FILE and exit",
    )
    p.add_argument(
        "--facts",
        type=int,
        default=0,
        metavar="N",
        help="use N invented facts (+ distractor documents) as the questions, added to --store (and POSTed to --model URL)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the invented facts")
    p.add_argument("--distractors", type=int, default=None, help="facts no question asks about (default: N)")
    p.add_argument(
        "--model",
        default=None,
        metavar="URL_OR_CKPT",
        help="answer accuracy with RAG on vs off: the URL of a served app (http://host:port[/prefix]) or a checkpoint",
    )
    p.add_argument("--api-key", default=None, help="API key for --model URL (default: $GENLOOP_API_KEY)")
    p.add_argument("--max-tokens", type=int, default=48, help="answer length (greedy)")
    p.add_argument("--show-answers", type=int, default=0, help="print this many questions with both answers")
    p.add_argument("--json", default=None, help="also write the results (with the missed questions) here")
    p.add_argument("--show-misses", type=int, default=0, help="print this many missed questions per ranker")
    return p


def run(args: argparse.Namespace) -> int:
    from serve.knowledge import KnowledgeStore
    from serve.rag_eval import build_store, doc_ranking, evaluate, load_questions, stdlib_corpus, stdlib_questions
    from serve.vectors import load_embedder

    if args.write_questions:
        from pathlib import Path

        qs = stdlib_questions()
        out = Path(args.write_questions)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("".join(json.dumps(q) + "\n" for q in qs))
        print(f"wrote {len(qs)} questions to {out}")
        return 0
    if args.k < 1 or args.depth < args.k:
        raise ValueError(f"need 1 <= --k ({args.k}) <= --depth ({args.depth})")
    store = KnowledgeStore(
        args.store,
        embedder=load_embedder(args.embedder),
        rrf_k=args.rrf_k,
        candidates=args.candidates,
        reindex=args.reindex,
    )
    remote = bool(args.model) and args.model.startswith(("http://", "https://"))
    api_key = args.api_key if args.api_key is not None else os.environ.get("GENLOOP_API_KEY", "")
    if args.facts:
        from serve.fact_eval import invented_facts, post_documents

        facts = invented_facts(args.facts, args.seed, args.distractors)
        questions, source = facts.questions, f"{args.facts} invented facts (seed {args.seed})"
        r = store.apply([store.check(d["id"], d["text"], d["title"]) for d in facts.documents])
        print(
            f"added {len(facts.documents)} fact documents to {store.path} ({r['added']} new, {r['replaced']} replaced)"
        )
        if remote:
            n = post_documents(args.model, facts.documents, api_key)
            print(f"POSTed {n} fact documents to {args.model}/v1/documents")
    else:
        questions, source = load_questions(args.questions), args.questions
    if args.build_stdlib and store.count() == 0:
        t = time.perf_counter()
        c = build_store(store, stdlib_corpus())
        print(
            f"built {store.path}: {c['added']} documents, {c['chunks']} chunks, {c['skipped']} skipped "
            f"({time.perf_counter() - t:.1f} s)"
        )
    missing = sorted({q["doc"] for q in questions} - set(store.ids()))
    if missing:
        print(
            f"warning: {len(missing)} expected document(s) are not in the store (e.g. {missing[0]}); those "
            "questions count as misses"
        )
    if store.embedder is not None:
        t = time.perf_counter()
        r = store.reindex()
        print(
            f"vector index ({store.embedder.identity}): {r['vectors']} vectors, {r['embedded']} embedded now "
            f"({time.perf_counter() - t:.1f} s)"
        )
    modes = ["lexical"] + (["dense", "hybrid"] if store.embedder is not None else [])
    rankers = {m: (lambda q, m=m: doc_ranking(store, q, m, args.depth)) for m in modes}
    t = time.perf_counter()
    res = evaluate(questions, rankers, ks=(1, args.k) if args.k != 1 else (1,))
    secs = time.perf_counter() - t
    names = {
        "lexical": "BM25 (code-aware terms)",
        "dense": f"dense ({args.embedder})",
        "hybrid": f"hybrid RRF k={args.rrf_k:g}",
    }
    cols = ["recall@1"] + ([f"recall@{args.k}"] if args.k != 1 else []) + ["mrr"]
    print(f"{len(questions)} questions from {source}; store {store.path} ({store.count()} documents); {secs:.1f} s")
    print(f"{'retrieval':34s} " + " ".join(f"{c:>9s}" for c in cols))
    for m in modes:
        print(f"{names[m]:34s} " + " ".join(f"{res[m][c]:9.3f}" for c in cols))
    for m in modes:
        for q in res[m]["misses"][: args.show_misses]:
            print(f"  {m} missed: {q}")
    answers = None
    if args.model:
        from serve.fact_eval import answer_accuracy, format_accuracy, local_answerer, served_answerer

        ask = (
            served_answerer(args.model, api_key, args.max_tokens)
            if remote
            else local_answerer(args.model, store, args.k, args.max_tokens)
        )
        t = time.perf_counter()
        answers = answer_accuracy(questions, ask, show=args.show_answers)
        where = "served" if remote else f"run here, top {args.k} passages"
        print(
            f"answers of {args.model} ({where}; greedy, max {args.max_tokens} tokens; {time.perf_counter() - t:.0f} s)"
        )
        for line in format_accuracy(answers):
            print(line)
        for m in answers["rag_on"]["misses"][: args.show_misses]:
            print(f"  RAG on missed: {m['question']}  expected: {m['answer']}  answered: {m['response']!r}")
        for s in answers["samples"]:
            print(f"  Q: {s['question']}  expected: {s['answer']}")
            print(f"     RAG on:  {s['rag_on']!r}")
            print(f"     RAG off: {s['rag_off']!r}")
    if args.json:
        from pathlib import Path

        Path(args.json).write_text(
            json.dumps(
                {
                    "questions": source,
                    "model": args.model,
                    "store": str(store.path),
                    "embedder": args.embedder,
                    "rrf_k": args.rrf_k,
                    "results": res,
                    "answers": answers,
                },
                indent=1,
            )
        )
    return 0

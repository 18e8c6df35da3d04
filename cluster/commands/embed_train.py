"""``genloop embed-train --init-from lsa:DIR --out DIR [--data DIR]``: fine-tune a retriever on pairs the corpus
gives for free (a function's or class's docstring -> its code) with in-batch-negative InfoNCE (cosine, scale 20),
and report retrieval recall@1/5 and MRR on held-out pairs (files never trained on) before and after, beside BM25's.
Training runs on the shared loop (``pipelines.train``) under Ray Train (``--address`` / an embedded local Ray), or in
this process with ``--in-process``; the loop's metrics.jsonl and loss curve land in ``--out``.

The model is the LSA embedder's bag-of-terms encoder (``genloop knowledge embedder``): its projection matrix is what
trains, so the result is again an ``lsa:`` embedder that ``serve.rag_embedder`` / ``rag-eval --embedder`` load.
``--data``: a folder of Python sources (default: the standard library, as ``rag-eval --build-stdlib``). Module
docstrings are never used (the rag-eval questions come from them). Fine-tuning a genloop checkpoint (a transformer
bi-encoder) is not here yet: ``--init-from`` takes ``lsa:DIR``.
"""

from __future__ import annotations

import argparse
import json

from cluster.commands.base import add_address

HELP = "fine-tune a retriever with in-batch-negative InfoNCE on docstring -> code pairs; held-out recall@k"


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "embed-train", help=HELP, description=HELP, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--init-from", required=True, help="lsa:DIR, an embedder from `genloop knowledge embedder`")
    p.add_argument("--out", required=True, help="folder for the trained embedder (serve it as lsa:OUT)")
    p.add_argument("--data", default=None, help="a folder of .py files (default: this Python's standard library)")
    p.add_argument("--held-out", type=float, default=0.1, help="share of files held out for the recall report")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--batch", type=int, default=256, help="pairs per step (the in-batch negatives)")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--scale", type=float, default=20.0, help="cosine similarities are multiplied by this")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=1, help="Ray Train workers (DDP; each its own in-batch negatives)")
    p.add_argument("--in-process", action="store_true", help="run the training loop in this process, without Ray")
    add_address(p)
    return p


def _bm25_recall(pairs: list, k: int = 5) -> dict[str, float]:
    """BM25 (the knowledge store's lexical side) on the same held-out pairs: each code a document, each docstring a
    question."""
    import tempfile

    from serve.knowledge import KnowledgeStore
    from serve.rag_eval import doc_ranking, metrics

    with tempfile.TemporaryDirectory() as d:
        store = KnowledgeStore(d, chunk_chars=4000, chunk_overlap=0)
        for i, p in enumerate(pairs):
            store.add(f"p{i}", p.doc, title=p.name)
        ranks = [doc_ranking(store, p.query, "lexical", 50) for p in pairs]
        store.close()
    return metrics(ranks, [f"p{i}" for i in range(len(pairs))], (1, k))


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from pipelines.embed.pairs import corpus_pairs
    from pipelines.embed.train import EmbedTrainConfig, train
    from serve.rag_eval import stdlib_corpus
    from serve.vectors import LsaEmbedder

    kind, _, arg = args.init_from.partition(":")
    if kind != "lsa" or not arg:
        raise ValueError(f"--init-from {args.init_from}: only lsa:DIR (genloop knowledge embedder) for now")
    init = LsaEmbedder.load(arg)
    if args.data:
        root = Path(args.data)
        if not root.is_dir():
            raise FileNotFoundError(f"--data {root} is not a folder of Python sources")
        files = [(p, p.relative_to(root).as_posix()) for p in sorted(root.rglob("*.py"))]
    else:
        files = stdlib_corpus()
    tr, te = corpus_pairs(files, args.held_out)
    if len(tr) < 2 * args.batch or len(te) < 10:
        raise ValueError(
            f"{len(tr)} training and {len(te)} held-out pairs: too few; give --data with more documented functions"
        )
    print(f"{len(tr)} training pairs, {len(te)} held-out pairs (docstring -> code) from {len(files)} files")
    tq, td, hq, hd = (
        init.bags([getattr(p, f) for p in ps]) for ps, f in ((tr, "query"), (tr, "doc"), (te, "query"), (te, "doc"))
    )
    cfg = EmbedTrainConfig(
        epochs=args.epochs, batch=args.batch, lr=args.lr, scale=args.scale, seed=args.seed, num_workers=args.workers
    )
    if not args.in_process:
        from cluster.commands.base import start_ray

        start_ray(args)
    weight, rep = train(torch.from_numpy(init.proj), tq, td, hq, hd, cfg, args.out, in_process=args.in_process)
    out = LsaEmbedder(init.vocab, init.idf, weight.numpy(), "lsa:unsaved")
    identity = out.save(args.out)
    bm25 = _bm25_recall(te)
    rows = [
        ("BM25 (code-aware terms)", bm25),
        (f"before ({init.identity})", rep["before"]),
        (f"after ({identity})", rep["after"]),
    ]
    print(
        f"held-out docstring -> code retrieval among {len(te)} functions ({rep['steps']} steps of {args.batch} pairs):"
    )
    print(f"{'retriever':36s} {'recall@1':>9s} {'recall@5':>9s} {'mrr':>9s}")
    for name, m in rows:
        print(f"{name:36s} {m['recall@1']:9.3f} {m['recall@5']:9.3f} {m['mrr']:9.3f}")
    Path(args.out, "train_report.json").write_text(
        json.dumps(
            {
                "init_from": args.init_from,
                "identity": identity,
                "train_pairs": len(tr),
                "held_out_pairs": len(te),
                "bm25": bm25,
                "before": rep["before"],
                "after": rep["after"],
                "steps": rep["steps"],
                "config": vars(cfg),
            },
            indent=1,
        )
    )
    print(f"wrote {args.out} ({identity}); use it with --embedder lsa:{args.out} or serve.rag_embedder")
    return 0

"""``genloop embed-train --init-from (lsa:DIR | CKPT) --out DIR [--data DIR]``: fine-tune a retriever on pairs the
corpus gives for free (a function's or class's docstring -> its code) with in-batch-negative InfoNCE (cosine, scale
20), and report retrieval recall@1/5 and MRR on held-out pairs (files never trained on) before and after, beside
BM25's. Training runs on the shared loop (``pipelines.train``) under Ray Train (``--address`` / an embedded local
Ray), or in this process with ``--in-process``; the loop's metrics.jsonl and loss curve land in ``--out``, the numbers
in ``train_report.json``.

Two models:

- ``CKPT`` (``ckpt:DIR``, or a checkpoint folder: one a genloop stage wrote, or an imported Hugging Face model): a
  transformer bi-encoder (``pipelines.embed.bi_encoder``): mean-pooled final hidden states, both sides one model,
  each side cut to ``--max-tokens``. ``--out`` is a stage artifact (``manifest.json``, ``--overwrite``) with the
  trained checkpoint in ``model/`` (the model's tokenizer files kept): ``ckpt:OUT`` is the embedder
  (``serve.rag_embedder``, ``rag-eval --embedder``, ``knowledge --embedder``).
- ``lsa:DIR`` (``genloop knowledge embedder``): the LSA bag-of-terms encoder, its projection matrix trained; the
  result is again an ``lsa:`` embedder (``lsa:OUT``).

``--data``: a folder of Python sources (default: the standard library, as ``rag-eval --build-stdlib``). Module
docstrings are never used (the rag-eval questions come from them).
"""

from __future__ import annotations

import argparse
import json

from cluster.commands.base import add_address

HELP = "fine-tune a retriever with in-batch-negative InfoNCE on docstring -> code pairs; held-out recall@k"

# per model kind: (epochs, batch, lr); a transformer fine-tunes gently, the LSA matrix takes big steps
DEFAULTS = {"lsa": (4, 256, 3e-3), "ckpt": (1, 32, 5e-5)}


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "embed-train", help=HELP, description=HELP, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument(
        "--init-from",
        required=True,
        help="ckpt:DIR or a checkpoint folder (genloop-trained or imported): a transformer bi-encoder; or lsa:DIR, "
        "an embedder from `genloop knowledge embedder`",
    )
    p.add_argument("--out", required=True, help="folder for the trained embedder (serve it as ckpt:OUT / lsa:OUT)")
    p.add_argument("--data", default=None, help="a folder of .py files (default: this Python's standard library)")
    p.add_argument("--held-out", type=float, default=0.1, help="share of files held out for the recall report")
    p.add_argument("--epochs", type=int, default=None, help="passes over the pairs (default: lsa 4, ckpt 1)")
    p.add_argument("--steps", type=int, default=0, help="optimizer steps (ckpt); 0 = from --epochs")
    p.add_argument(
        "--batch",
        type=int,
        default=None,
        help="pairs per step and worker: the in-batch negatives (default: lsa 256, ckpt 32)",
    )
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default: lsa 3e-3, ckpt 5e-5)")
    p.add_argument("--max-tokens", type=int, default=128, help="tokens kept per side (ckpt): longer code is cut")
    p.add_argument(
        "--max-pairs", type=int, default=0, help="train on at most this many pairs (a seeded sample); 0 = all"
    )
    p.add_argument("--max-held-out", type=int, default=0, help="report on at most this many held-out pairs; 0 = all")
    p.add_argument("--scale", type=float, default=20.0, help="cosine similarities are multiplied by this")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=1, help="Ray Train workers (DDP; each its own in-batch negatives)")
    p.add_argument("--in-process", action="store_true", help="run the training loop in this process, without Ray")
    p.add_argument("--overwrite", action="store_true", help="replace a finished embed-train artifact at --out (ckpt)")
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


def _pairs(args: argparse.Namespace) -> tuple[list, list, int]:
    """(training pairs, held-out pairs, files) from ``--data`` or the standard library, capped and sampled."""
    import random
    from pathlib import Path

    from pipelines.embed.pairs import corpus_pairs
    from serve.rag_eval import stdlib_corpus

    if args.data:
        root = Path(args.data)
        if not root.is_dir():
            raise FileNotFoundError(f"--data {root} is not a folder of Python sources")
        files = [(p, p.relative_to(root).as_posix()) for p in sorted(root.rglob("*.py"))]
    else:
        files = stdlib_corpus()
    tr, te = corpus_pairs(files, args.held_out)
    rng = random.Random(args.seed)
    if args.max_pairs and len(tr) > args.max_pairs:
        tr = rng.sample(tr, args.max_pairs)
    if args.max_held_out and len(te) > args.max_held_out:
        te = rng.sample(te, args.max_held_out)
    return tr, te, len(files)


def _report(args, te: list, before_name: str, after_name: str, rep: dict, batch: int, extra: dict) -> dict:
    """Print the before / after / BM25 table and write ``train_report.json``; returns the report."""
    from pathlib import Path

    bm25 = _bm25_recall(te)
    rows = [
        ("BM25 (code-aware terms)", bm25),
        (f"before ({before_name})", rep["before"]),
        (f"after ({after_name})", rep["after"]),
    ]
    print(f"held-out docstring -> code retrieval among {len(te)} functions ({rep['steps']} steps of {batch} pairs):")
    print(f"{'retriever':36s} {'recall@1':>9s} {'recall@5':>9s} {'mrr':>9s}")
    for name, m in rows:
        print(f"{name:36s} {m['recall@1']:9.3f} {m['recall@5']:9.3f} {m['mrr']:9.3f}")
    report = {
        "init_from": args.init_from,
        "held_out_pairs": len(te),
        "bm25": bm25,
        "before": rep["before"],
        "after": rep["after"],
        "steps": rep["steps"],
        **extra,
    }
    Path(args.out, "train_report.json").write_text(json.dumps(report, indent=1))
    return report


def run(args: argparse.Namespace) -> int:
    kind, _, arg = args.init_from.partition(":")
    if kind == "lsa":
        if not arg:
            raise ValueError("--init-from lsa:DIR needs the folder (genloop knowledge embedder --out DIR)")
        return _run_lsa(args, arg)
    return _run_ckpt(args, arg if kind == "ckpt" else args.init_from)


def _settings(args: argparse.Namespace, kind: str) -> tuple[int, int, float]:
    epochs, batch, lr = DEFAULTS[kind]
    return (
        args.epochs if args.epochs is not None else epochs,
        args.batch if args.batch is not None else batch,
        args.lr if args.lr is not None else lr,
    )


def _run_ckpt(args: argparse.Namespace, path: str) -> int:
    """A transformer checkpoint fine-tuned into a bi-encoder: a stage artifact with the model in ``model/``."""
    import os

    from models.checkpoint import load_config, resolve_checkpoint
    from pipelines.embed.bi_encoder import BiEncoderConfig, train_bi_encoder
    from pipelines.lifecycle import begin_stage, check_out

    ckpt = os.path.abspath(resolve_checkpoint(path))
    load_config(ckpt)  # an unsupported model fails here, before any pair is made
    epochs, batch, lr = _settings(args, "ckpt")
    if args.max_tokens < 1:
        raise ValueError(f"--max-tokens {args.max_tokens}: give the tokens kept per side (e.g. 128)")
    cfg = BiEncoderConfig(
        epochs=epochs,
        steps=args.steps,
        batch=batch,
        lr=lr,
        scale=args.scale,
        max_tokens=args.max_tokens,
        seed=args.seed,
        num_workers=args.workers,
    )
    check_out("embed-train", args.out, args.overwrite)  # a finished or foreign --out fails before any work
    tr, te, n_files = _pairs(args)
    if len(tr) < 2 * batch * args.workers or len(te) < 10:
        raise ValueError(
            f"{len(tr)} training and {len(te)} held-out pairs: too few for --batch {batch}; give --data with more "
            "documented functions or lower --batch"
        )
    print(f"{len(tr)} training pairs, {len(te)} held-out pairs (docstring -> code) from {n_files} files")
    config = {"init_from": ckpt, "data": args.data or "<stdlib>", "held_out": args.held_out, **vars(cfg)}
    stage = begin_stage(
        "embed-train",
        args.out,
        config,
        inputs={"--init-from": ckpt, "--data": args.data},
        overwrite=args.overwrite,
        resume=False,
    )
    if not args.in_process:
        from cluster.commands.base import start_ray

        start_ray(args)
    rep = train_bi_encoder(
        ckpt,
        ([p.query for p in tr], [p.doc for p in tr]),
        ([p.query for p in te], [p.doc for p in te]),
        cfg,
        args.out,
        in_process=args.in_process,
    )
    report = _report(
        args,
        te,
        os.path.basename(ckpt.rstrip("/")),
        "trained",
        rep,
        batch,
        {"train_pairs": len(tr), "model": rep["model"], "cut_documents": rep["cut_documents"], "config": config},
    )
    metrics = {f"heldout_{k}": v for k, v in rep["after"].items()}
    metrics.update({f"heldout_{k}_before": v for k, v in rep["before"].items()})
    metrics.update({f"bm25_{k}": v for k, v in report["bm25"].items()}, steps=rep["steps"], **rep["metrics"])
    stage.finish(counts={"train_pairs": len(tr), "held_out_pairs": len(te), "files": n_files}, metrics=metrics)
    print(f"wrote {args.out}; use it with --embedder ckpt:{args.out} or serve.rag_embedder=ckpt:{args.out}")
    return 0


def _run_lsa(args: argparse.Namespace, arg: str) -> int:
    import torch

    from pipelines.embed.train import EmbedTrainConfig, train
    from serve.vectors import LsaEmbedder

    init = LsaEmbedder.load(arg)
    epochs, batch, lr = _settings(args, "lsa")
    tr, te, n_files = _pairs(args)
    if len(tr) < 2 * batch or len(te) < 10:
        raise ValueError(
            f"{len(tr)} training and {len(te)} held-out pairs: too few; give --data with more documented functions"
        )
    print(f"{len(tr)} training pairs, {len(te)} held-out pairs (docstring -> code) from {n_files} files")
    tq, td, hq, hd = (
        init.bags([getattr(p, f) for p in ps]) for ps, f in ((tr, "query"), (tr, "doc"), (te, "query"), (te, "doc"))
    )
    cfg = EmbedTrainConfig(
        epochs=epochs, batch=batch, lr=lr, scale=args.scale, seed=args.seed, num_workers=args.workers
    )
    if not args.in_process:
        from cluster.commands.base import start_ray

        start_ray(args)
    weight, rep = train(torch.from_numpy(init.proj), tq, td, hq, hd, cfg, args.out, in_process=args.in_process)
    out = LsaEmbedder(init.vocab, init.idf, weight.numpy(), "lsa:unsaved")
    identity = out.save(args.out)
    _report(
        args,
        te,
        init.identity,
        identity,
        rep,
        batch,
        {"identity": identity, "train_pairs": len(tr), "config": vars(cfg)},
    )
    print(f"wrote {args.out} ({identity}); use it with --embedder lsa:{args.out} or serve.rag_embedder")
    return 0

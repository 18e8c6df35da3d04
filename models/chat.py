"""Conversations -> token ids + per-token assistant mask, through the checkpoint's own chat template.

The template saved in a checkpoint's ``tokenizer_config.json`` is the source of truth: it is rendered here with jinja2
exactly as ``transformers``' ``apply_chat_template`` renders it (``ImmutableSandboxedEnvironment`` with
``trim_blocks``/``lstrip_blocks``, ``loopcontrols``, the same ``tojson``/``raise_exception``/``strftime_now``, the
tokenizer's special tokens as template variables), and the text is encoded with the genloop tokenizer with special
tokens allowed, which is what ``apply_chat_template(..., tokenize=True)`` does with ``add_special_tokens=False``.
So training and serving (vLLM / transformers) format a conversation identically.

Assistant mask: the template is rendered on growing prefixes of the conversation. For assistant message ``i`` its span
in the text starts where ``render(messages[:i], add_generation_prompt=True)`` ends and stops where
``render(messages[:i+1])`` ends, minus trailing whitespace (ChatML: the content plus its closing ``<|im_end|>``, not the
``\\n`` separator). A token belongs to the assistant when its first byte (a Hugging Face tokenizer: its first
character, from the encoding's offsets) lies inside a span; a token straddling the start of a span (a merge across the
header/content boundary) stays a prompt token.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from models.tokenizer import CHAT_TEMPLATE, Tokenizer

log = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")
Message = dict[str, str]


class ChatError(ValueError):
    """A conversation the template cannot render; the message says which and why."""


class _Generation(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}`` renders its body (transformers' marker for assistant spans)."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Any) -> str:
        return caller()


def _tojson(
    x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None, sort_keys: bool = False
) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


@lru_cache(maxsize=16)
def compile_template(template: str) -> jinja2.Template:
    """The template compiled in the environment transformers uses."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


@dataclass(frozen=True)
class ChatFormat:
    """A checkpoint's chat template plus the special-token variables transformers passes to it."""

    template: str = CHAT_TEMPLATE
    variables: tuple[tuple[str, str], ...] = ()

    @classmethod
    def from_checkpoint(cls, path: str | Path) -> "ChatFormat":
        """The template saved with the checkpoint's tokenizer (the one serving uses): ``chat_template.jinja`` (how
        transformers 5 saves it) or ``chat_template`` in ``<path>/tokenizer_config.json`` (a string, or a list of
        named templates: the ``default`` one)."""
        path = Path(path)
        cfg_path = path / "tokenizer_config.json"
        if not cfg_path.exists():
            raise ChatError(
                f"{cfg_path} not found: point at a checkpoint folder written by a genloop training stage "
                "or a Hugging Face model folder with its tokenizer files"
            )
        try:
            cfg = json.loads(cfg_path.read_text())
        except json.JSONDecodeError as e:
            raise ChatError(f"{cfg_path} is not valid JSON ({e}); re-export the checkpoint") from None
        template = cfg.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
            template = next((t.get("template") for t in template if t.get("name") == "default"), None)
        if (path / "chat_template.jinja").is_file():
            template = (path / "chat_template.jinja").read_text()
        if not isinstance(template, str) or not template:
            raise ChatError(
                f"{cfg_path} has no chat_template (nor is there a chat_template.jinja); re-export the "
                "checkpoint with save_checkpoint, or add the model's chat template"
            )
        special_map = path / "special_tokens_map.json"
        tokens = json.loads(special_map.read_text()) if special_map.is_file() else {}
        tokens.update({k: v for k, v in cfg.items() if v is not None})
        keys = ("bos_token", "eos_token", "unk_token", "pad_token")
        variables = tuple((k, _token_text(tokens.get(k))) for k in keys if _token_text(tokens.get(k)) is not None)
        return cls(template=template, variables=variables)

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = False) -> str:
        try:
            return compile_template(self.template).render(
                messages=list(messages),
                tools=None,
                documents=None,
                add_generation_prompt=add_generation_prompt,
                **dict(self.variables),
            )
        except jinja2.exceptions.TemplateError as e:
            raise ChatError(f"chat template failed on this conversation: {e}") from None


def _token_text(tok: Any) -> str | None:
    """A special token as tokenizer_config.json spells it: a string, or an AddedToken dict with ``content``."""
    if isinstance(tok, dict):
        tok = tok.get("content")
    return tok if isinstance(tok, str) else None


def assistant_spans(fmt: ChatFormat, messages: Sequence[Message]) -> tuple[str, list[tuple[int, int]]]:
    """(full text, [(start, end) character spans of each assistant turn]) via incremental prefix rendering."""
    full = fmt.render(messages)
    spans: list[tuple[int, int]] = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        head = fmt.render(messages[:i], add_generation_prompt=True)
        upto = fmt.render(messages[: i + 1])
        if not full.startswith(upto) or not upto.startswith(head):
            raise ChatError(
                "chat template is not prefix-stable (rendering a conversation prefix changes earlier "
                "text), so assistant turns cannot be located; use a ChatML-like template"
            )
        end = len(upto.rstrip())
        spans.append((len(head), max(end, len(head))))
    return full, spans


def token_byte_lengths(tok: Tokenizer, ids: Sequence[int]) -> list[int]:
    """Bytes each token stands for (special tokens: their text), so token i covers bytes [sum(:i), sum(:i+1))."""
    inv = {v: k for k, v in tok.special_tokens.items()}
    return [len(inv[i].encode()) if i in inv else len(tok.token_bytes(i)) for i in ids]


def encode_chat(
    tok: Tokenizer, fmt: ChatFormat, messages: Sequence[Message], train_on: str = "assistant"
) -> tuple[list[int], list[int]]:
    """(ids, mask): the rendered conversation's token ids and 1 where the loss applies, 0 elsewhere.

    ``train_on="assistant"``: 1 on each assistant turn's content and its closing end token; ``"all"``: 1 everywhere.
    ``ids`` equal ``AutoTokenizer.from_pretrained(ckpt).apply_chat_template(messages, tokenize=True)``.
    """
    if train_on not in ("assistant", "all"):
        raise ChatError(f"train_on must be 'assistant' or 'all', got {train_on!r}")
    text, spans = assistant_spans(fmt, messages)
    if train_on == "all":
        ids = tok.encode(text, allow_special=True)
        return ids, [1] * len(ids)
    if hasattr(tok, "encode_offsets"):  # a Hugging Face tokenizer knows where each token starts in the text
        ids, starts = tok.encode_offsets(text)
        return ids, [int(any(s <= c < e for s, e in spans)) for c in starts]
    ids = tok.encode(text, allow_special=True)
    # character spans -> byte spans (tokens are byte sequences; a multi-byte character may be split across tokens)
    byte_spans = [(len(text[:s].encode()), len(text[:e].encode())) for s, e in spans]
    mask = [0] * len(ids)
    pos = 0
    j = 0
    for k, n in enumerate(token_byte_lengths(tok, ids)):
        while j < len(byte_spans) and byte_spans[j][1] <= pos:
            j += 1
        if j < len(byte_spans) and byte_spans[j][0] <= pos < byte_spans[j][1]:
            mask[k] = 1
        pos += n
    return ids, mask


def encode_prompt(tok: Tokenizer, fmt: ChatFormat, messages: Sequence[Message]) -> list[int]:
    """Ids of a conversation followed by the assistant header: what a server feeds the model to answer."""
    return tok.encode(fmt.render(messages, add_generation_prompt=True), allow_special=True)

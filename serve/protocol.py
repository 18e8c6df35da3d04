"""The OpenAI-compatible wire format and the HTTP layer's plain helpers (no Ray, no vLLM; unit-testable).

Request schemas (pydantic), OpenAI-style errors (``{"error": {"message", "type", "param", "code"}}``), API keys,
the per-key rate limiter, and incremental detokenisation with stop strings for streaming.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from models.tokenizer import Tokenizer


# ---------------------------------------------------------------------------------------------------------------
# errors


class APIError(Exception):
    """An error the client caused (or 5xx); rendered as OpenAI's error body with ``status``."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
             404: "not_found_error", 409: "invalid_request_error", 413: "invalid_request_error",
             422: "invalid_request_error", 429: "rate_limit_error", 503: "server_error"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or self.TYPES.get(status, "server_error")

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def validation_error(e: ValidationError) -> APIError:
    """pydantic's first complaint as a 422 naming the field."""
    err = e.errors()[0]
    loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
    return APIError(422, f"{loc or 'body'}: {err.get('msg', 'invalid value')}", param=loc or None,
                    code="invalid_type" if "type" in err.get("type", "") else "invalid_value")


def parse_body(raw: bytes, model: type[BaseModel], max_bytes: int) -> BaseModel:
    """Bytes -> validated request: 413 when too big, 400 when not a JSON object, 422 when fields are wrong."""
    if len(raw) > max_bytes:
        raise APIError(413, f"request body is {len(raw)} bytes, over the limit of {max_bytes}; send less per request",
                       code="request_too_large")
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"request body is not valid JSON ({e})", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, "request body must be a JSON object", code="invalid_json")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise validation_error(e) from None


# ---------------------------------------------------------------------------------------------------------------
# requests


class _Req(BaseModel):
    # unknown fields are kept (not an error at parse time) so that ``check_options`` can answer 400 naming them
    model_config = ConfigDict(extra="allow")


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # checked by ChatRequest.check_options
    role: Literal["system", "user", "assistant"]
    content: str | list[dict[str, Any]]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise APIError(400, "only text content parts are supported ({'type': 'text', 'text': ...})",
                               param="messages", code="unsupported_content")
            parts.append(part["text"])
        return "".join(parts)


class StreamOptions(BaseModel):
    include_usage: bool = False


class ResponseFormat(BaseModel):
    """OpenAI's ``response_format``: ``text``, ``json_object`` (any JSON object) or ``json_schema``
    (``{"json_schema": {"name", "schema", "strict"}}``), honoured through vLLM's structured outputs."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None

    def schema(self) -> dict | None:
        if self.type != "json_schema":
            return None
        js = self.json_schema or {}
        schema = js.get("schema")
        if not isinstance(schema, dict):
            raise APIError(400, "response_format json_schema needs {'json_schema': {'name': ..., 'schema': {...}}}",
                           param="response_format")
        return schema


# options a vLLM client may send that this server does not honour: 400 naming them, never silently ignored (the
# value in the second column is the one harmless value still accepted)
UNSUPPORTED = {
    "tools": "tool calling needs a tool parser, and this model has none",
    "tool_choice": "tool calling needs a tool parser, and this model has none",
    "functions": "function calling needs a tool parser, and this model has none",
    "function_call": "function calling needs a tool parser, and this model has none",
    "parallel_tool_calls": "tool calling needs a tool parser, and this model has none",
    "echo": "echoing the prompt is not supported",
    "suffix": "suffix (insertion) is not supported",
    "best_of": "best_of is not supported (use n)",
    "audio": "audio output is not supported", "modalities": "only text output is supported",
    "prediction": "predicted outputs are not supported", "reasoning_effort": "this model does not reason",
    "web_search_options": "web search is not supported", "store": "stored completions are not supported",
    "metadata": "stored completions are not supported", "service_tier": "service tiers are not supported",
}
HARMLESS = {"echo": False, "store": False, "parallel_tool_calls": None, "tool_choice": "none"}
MAX_LOGPROBS = 20  # vLLM's default max_logprobs


class _Sampling(_Req):
    model: str
    max_tokens: int | None = Field(default=None)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int | None = None  # vLLM's extension; None or <= 0: off
    min_p: float = Field(default=0.0, ge=0.0, le=1.0)  # vLLM's extension
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(default=1.0, gt=0.0, le=2.0)  # vLLM's extension
    logit_bias: dict[str, float] | None = None  # token id (as a string) -> bias in [-100, 100]
    response_format: ResponseFormat | None = None
    n: int = Field(default=1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    user: str | None = None
    ignore_eos: bool = False  # vLLM's extension: generate exactly max_tokens (benchmarks)

    def stops(self) -> list[str]:
        s = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(s) > 4 or any(not x for x in s):
            raise APIError(400, "'stop' takes up to 4 non-empty strings", param="stop")
        return s

    def check_options(self) -> None:
        """400 naming the first option sent that this server does not honour (unknown fields included)."""
        for key, value in (self.model_extra or {}).items():
            if key in HARMLESS and value == HARMLESS[key]:
                continue
            if key == "best_of" and value in (None, self.n):
                continue
            why = UNSUPPORTED.get(key, "this server does not know this option")
            raise APIError(400, f"option '{key}' is not supported: {why}; remove it from the request", param=key,
                           code="unsupported_option")

    def bias(self, n_vocab: int) -> dict[int, float] | None:
        """``logit_bias`` as token id -> bias, checked against the vocabulary."""
        if not self.logit_bias:
            return None
        out: dict[int, float] = {}
        for k, v in self.logit_bias.items():
            if not k.lstrip("-").isdigit() or not 0 <= int(k) < n_vocab:
                raise APIError(400, f"logit_bias key {k!r} is not a token id of this model (0..{n_vocab - 1})",
                               param="logit_bias")
            if not -100.0 <= v <= 100.0:
                raise APIError(400, f"logit_bias value {v} for token {k} is outside [-100, 100]", param="logit_bias")
            out[int(k)] = float(v)
        return out

    def top_logprobs_k(self) -> int | None:
        """How many alternatives per token to return (None: no log-probs); each endpoint reads its own fields."""
        raise NotImplementedError


class ChatRequest(_Sampling):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    rag: bool = True  # genloop extension: retrieve documents and memory into the prompt (per request)

    def check_options(self) -> None:
        """Also each message's fields: ``name``, ``tool_calls`` and the like are not honoured (empty values pass,
        as a client sends them when it echoes a previous answer back)."""
        super().check_options()
        for i, m in enumerate(self.messages):
            for key, value in (m.model_extra or {}).items():
                if value not in (None, [], "", {}):
                    raise APIError(400, f"messages[{i}].{key} is not supported by this server's chat format; remove "
                                        "it", param=f"messages[{i}].{key}", code="unsupported_option")

    def top_logprobs_k(self) -> int | None:
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        if not self.logprobs:
            return None
        k = self.top_logprobs or 0
        if not 0 <= k <= MAX_LOGPROBS:
            raise APIError(400, f"top_logprobs must be 0..{MAX_LOGPROBS}, got {k}", param="top_logprobs")
        return k


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int]
    logprobs: int | None = None

    def top_logprobs_k(self) -> int | None:
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise APIError(400, f"logprobs must be 0..{MAX_LOGPROBS}, got {self.logprobs}", param="logprobs")
        return self.logprobs

    def prompt_value(self) -> str | list[int]:
        p = self.prompt
        if isinstance(p, list) and p and all(isinstance(x, str) for x in p):
            if len(p) != 1:
                raise APIError(400, "send one prompt per request (got a list of several)", param="prompt")
            return p[0]
        if isinstance(p, list) and not p:
            raise APIError(400, "prompt is empty", param="prompt")
        return p


class EmbeddingRequest(_Req):
    """OpenAI's embeddings request: ``input`` a string, a list of strings, a list of token ids or a list of those."""

    model: str
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    user: str | None = None

    def check_options(self) -> None:
        for key in (self.model_extra or {}):
            why = "the embedding's size is the model's hidden size" if key == "dimensions" else \
                "this server does not know this option"
            raise APIError(400, f"option '{key}' is not supported: {why}; remove it from the request", param=key,
                           code="unsupported_option")


class AdminModelRequest(BaseModel):
    """``POST /admin/models``: the checkpoint to serve (a folder or URI the server can read)."""

    model_config = ConfigDict(extra="forbid")
    model: str


class DocumentIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str | None = None
    title: str | None = None
    text: str


class DocumentsRequest(BaseModel):
    """Either one document (``id``, ``title``, ``text``) or ``{"documents": [...]}``."""

    model_config = ConfigDict(extra="forbid")
    id: str | None = None
    title: str | None = None
    text: str | None = None
    documents: list[DocumentIn] | None = None

    def docs(self) -> list[DocumentIn]:
        if self.documents is not None:
            if self.text is not None:
                raise APIError(400, "send either 'text' or 'documents', not both", param="documents")
            if not self.documents:
                raise APIError(400, "'documents' is empty", param="documents")
            return self.documents
        if self.text is None:
            raise APIError(422, "a document needs 'text' (or send a 'documents' list)", param="text")
        return [DocumentIn(id=self.id, title=self.title, text=self.text)]


class MemoryRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    user: str
    fact: str


class FeedbackRequest(BaseModel):
    """A rating (``response_id`` + ``rating``: "up" | "down" | 1..5) or a preference (``chosen_id``, ``rejected_id``)."""

    model_config = ConfigDict(extra="forbid")
    response_id: str | None = None
    rating: str | int | None = None
    chosen_id: str | None = None
    rejected_id: str | None = None
    comment: str | None = None


# ---------------------------------------------------------------------------------------------------------------
# API keys and rate limit


def key_id(key: str) -> str:
    """A stable, non-secret name for a key (memory namespaces, logs): never the key itself."""
    return "k" + hashlib.sha256(key.encode()).hexdigest()[:12]


def load_api_keys(path: str | Path) -> frozenset[str]:
    """sha256 hex digests of the keys in ``path`` (one per line; blank lines and ``#`` comments skipped)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"API key file {p} does not exist; write one key per line or drop --api-key-file")
    keys = [ln.strip() for ln in p.read_text().splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    if not keys:
        raise ValueError(f"API key file {p} holds no keys; write one key per line")
    return frozenset(hashlib.sha256(k.encode()).hexdigest() for k in keys)


def authorize(header: str | None, key_hashes: frozenset[str]) -> str:
    """The caller's key id from ``Authorization: Bearer KEY``; ``"anon"`` when no keys are configured; else 401."""
    if not key_hashes:
        return "anon"
    if not header or not header.lower().startswith("bearer ") or not header[7:].strip():
        raise APIError(401, "missing API key: send 'Authorization: Bearer YOUR_KEY'", code="invalid_api_key")
    key = header[7:].strip()
    if hashlib.sha256(key.encode()).hexdigest() not in key_hashes:
        raise APIError(401, "invalid API key", code="invalid_api_key")
    return key_id(key)


def authorize_admin(header: str | None, admin_hashes: frozenset[str]) -> None:
    """An admin route's guard: 403 when no admin key is configured (the routes are off) or the key is not an admin
    key, 401 when no key is sent."""
    if not admin_hashes:
        raise APIError(403, "admin routes are off on this server; start it with serve.admin_key_file=FILE (one "
                            "admin key per line)", code="admin_disabled")
    if not header or not header.lower().startswith("bearer ") or not header[7:].strip():
        raise APIError(401, "missing admin key: send 'Authorization: Bearer ADMIN_KEY'", code="invalid_admin_key")
    if hashlib.sha256(header[7:].strip().encode()).hexdigest() not in admin_hashes:
        raise APIError(403, "this key is not an admin key", code="invalid_admin_key")


class RateLimiter:
    """Token bucket per caller: ``per_minute`` requests, bursts up to ``per_minute``; 0 disables it.

    State lives in each ingress replica, so with R replicas a key may get up to R x the limit.
    """

    def __init__(self, per_minute: int, clock=time.monotonic) -> None:
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0
        self.clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # caller -> (tokens, last time)
        self._lock = threading.Lock()

    def allow(self, caller: str) -> float:
        """0.0 when allowed (a token is taken), else the seconds to wait before the next request."""
        if self.capacity <= 0:
            return 0.0
        now = self.clock()
        with self._lock:
            tokens, last = self._buckets.get(caller, (self.capacity, now))
            tokens = min(self.capacity, tokens + (now - last) * self.rate)
            if tokens >= 1.0:
                self._buckets[caller] = (tokens - 1.0, now)
                return 0.0
            self._buckets[caller] = (tokens, now)
            return (1.0 - tokens) / self.rate


# ---------------------------------------------------------------------------------------------------------------
# streaming text


class TextStream:
    """Token ids arriving in pieces -> text pieces safe to send: never half a UTF-8 character, never a prefix of a
    stop string that may still complete; stop ids (end of turn) are not part of the text."""

    def __init__(self, tok: Tokenizer, stop_ids: set[int], stops: list[str]) -> None:
        self.tok, self.stop_ids, self.stops = tok, stop_ids, stops
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.ids: list[int] = []
        self.n_generated = 0
        self.sent = 0
        self.text = ""
        self.stopped = False  # a stop string was found: the caller should end the request
        self.lp_ids: list[int] = []  # tokens whose log-probs are not yet taken (take_logprobs), and those log-probs
        self.lps: list = []

    def push(self, new_ids: list[int], logprobs: list | None = None) -> str:
        """The text safe to send after ``new_ids``; ``logprobs`` (one per id, ``models.engine.stream_outputs``) are
        kept for the ids that become text (not stop ids, nothing after a stop string) until ``take_logprobs``."""
        self.n_generated += len(new_ids)
        if self.stopped:
            return ""
        if logprobs is not None:
            for i, lp in zip(new_ids, logprobs):
                if i not in self.stop_ids:
                    self.lp_ids.append(i)
                    self.lps.append(lp)
        self.ids += [i for i in new_ids if i not in self.stop_ids]
        text = self.tok.decode(self.ids)
        for s in self.stops:
            at = text.find(s)
            if at != -1:
                text, self.stopped = text[:at], True
        self.text = text
        safe = len(text) if self.stopped else len(text) - self.hold
        while safe > self.sent and text[safe - 1] == "\ufffd":  # an incomplete multi-byte character
            safe -= 1
        delta = text[self.sent:safe] if safe > self.sent else ""
        self.sent = max(self.sent, safe)
        return delta

    def take_logprobs(self) -> tuple[list[int], list]:
        """(token ids, their log-probs) pushed since the last call."""
        out = (self.lp_ids, self.lps)
        self.lp_ids, self.lps = [], []
        return out

    def flush(self) -> str:
        """What is left to send once generation ended."""
        delta = self.text[self.sent:]
        self.sent = len(self.text)
        return delta


# ---------------------------------------------------------------------------------------------------------------
# log-probs in OpenAI's shapes


def token_piece(tok: Tokenizer, token_id: int) -> tuple[str, list[int]]:
    """A token's text (undecodable bytes of a partial character as U+FFFD, as OpenAI shows them) and its bytes."""
    try:
        raw = tok.enc.decode_single_token_bytes(token_id)
    except KeyError:
        raw = b""
    return raw.decode("utf-8", errors="replace"), list(raw)


def chat_logprobs(tok: Tokenizer, ids: list[int], lps: list) -> list[dict[str, Any]]:
    """``choices[i].logprobs.content`` entries: one per token (``models.engine.stream_outputs`` log-probs)."""
    out = []
    for tid, (lp, top) in zip(ids, lps):
        text, raw = token_piece(tok, tid)
        alts = []
        for t, alp in top:
            at, ab = token_piece(tok, t)
            alts.append({"token": at, "logprob": alp, "bytes": ab})
        out.append({"token": text, "logprob": lp, "bytes": raw, "top_logprobs": alts})
    return out


def completion_logprobs(tok: Tokenizer, ids: list[int], lps: list, offset: int = 0) -> dict[str, list]:
    """``choices[i].logprobs`` of the legacy completions API: tokens, token_logprobs, top_logprobs, text_offset
    (``offset``: the characters already sent before these tokens)."""
    tokens, token_lps, tops, offsets = [], [], [], []
    for tid, (lp, top) in zip(ids, lps):
        text, _ = token_piece(tok, tid)
        tokens.append(text)
        token_lps.append(lp)
        tops.append({token_piece(tok, t)[0]: alp for t, alp in top})
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}

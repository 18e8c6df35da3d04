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

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
             413: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error"}

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
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields we do not use (e.g. frequency_penalty)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
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


class _Sampling(_Req):
    model: str
    max_tokens: int | None = Field(default=None)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = 1
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


class ChatRequest(_Sampling):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    rag: bool = True  # genloop extension: retrieve documents and memory into the prompt (per request)


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int]

    def prompt_value(self) -> str | list[int]:
        p = self.prompt
        if isinstance(p, list) and p and all(isinstance(x, str) for x in p):
            if len(p) != 1:
                raise APIError(400, "send one prompt per request (got a list of several)", param="prompt")
            return p[0]
        if isinstance(p, list) and not p:
            raise APIError(400, "prompt is empty", param="prompt")
        return p


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

    def push(self, new_ids: list[int]) -> str:
        self.n_generated += len(new_ids)
        if self.stopped:
            return ""
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

    def flush(self) -> str:
        """What is left to send once generation ended."""
        delta = self.text[self.sent:]
        self.sent = len(self.text)
        return delta

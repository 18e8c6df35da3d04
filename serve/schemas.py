"""The OpenAI-compatible request schemas (pydantic) and the parsing of a request body into one: 413 when too big,
400 when not JSON or when it holds text that UTF-8 (and so SQLite, the stores, the logs) cannot hold, 422 naming the
field when a field is wrong. Options a client may send that this server does not honour are a 400 naming them
(``check_options``), never silently ignored. No Ray, no vLLM: unit-testable."""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from serve.errors import APIError


def validation_error(e: ValidationError) -> APIError:
    """pydantic's first complaint as a 422 naming the field."""
    err = e.errors()[0]
    loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
    return APIError(
        422,
        f"{loc or 'body'}: {err.get('msg', 'invalid value')}",
        param=loc or None,
        code="invalid_type" if "type" in err.get("type", "") else "invalid_value",
    )


def unencodable(data: Any) -> str | None:
    """The path (``messages.0.content``) of the first string in parsed JSON that UTF-8 cannot hold (a lone UTF-16
    surrogate such as ``"\\ud800"``, valid JSON escape but no character), a key or a value; None when all can.
    Iterative: a deeply nested body cannot exhaust the stack."""
    stack: list[tuple[Any, str]] = [(data, "")]
    while stack:
        obj, path = stack.pop()
        if isinstance(obj, str):
            try:
                obj.encode("utf-8")
            except UnicodeEncodeError:
                return path or "body"
        elif isinstance(obj, dict):
            for k, v in obj.items():
                sub = f"{path}.{k}" if path else str(k)
                try:
                    k.encode("utf-8")
                except UnicodeEncodeError:
                    return (path or "body") + " (a key)"
                stack.append((v, sub))
        elif isinstance(obj, list):
            stack.extend((v, f"{path}.{i}" if path else str(i)) for i, v in enumerate(obj))
    return None


def parse_body(raw: bytes, model: type[BaseModel], max_bytes: int) -> BaseModel:
    """Bytes -> validated request: 413 when too big, 400 when not a JSON object (or nested too deep to parse) or when
    a string holds text UTF-8 cannot hold (a lone surrogate: no store, log or response could keep it), 422 when
    fields are wrong."""
    if len(raw) > max_bytes:
        raise APIError(
            413,
            f"request body is {len(raw)} bytes, over the limit of {max_bytes}; send less per request",
            code="request_too_large",
        )
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"request body is not valid JSON ({e})", code="invalid_json") from None
    except RecursionError:
        raise APIError(400, "request body is nested too deeply to parse", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, "request body must be a JSON object", code="invalid_json")
    bad = unencodable(data)
    if bad is not None:
        raise APIError(
            400,
            f"{bad}: the text holds a lone UTF-16 surrogate (an escape such as \\ud800 without its "
            "pair), which is not a character; send valid Unicode text",
            param=bad.split(" ")[0],
            code="invalid_unicode",
        )
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise validation_error(e) from None


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
                raise APIError(
                    400,
                    "only text content parts are supported ({'type': 'text', 'text': ...})",
                    param="messages",
                    code="unsupported_content",
                )
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
            raise APIError(
                400,
                "response_format json_schema needs {'json_schema': {'name': ..., 'schema': {...}}}",
                param="response_format",
            )
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
    "audio": "audio output is not supported",
    "modalities": "only text output is supported",
    "prediction": "predicted outputs are not supported",
    "reasoning_effort": "this model does not reason",
    "web_search_options": "web search is not supported",
    "store": "stored completions are not supported",
    "metadata": "stored completions are not supported",
    "service_tier": "service tiers are not supported",
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
            raise APIError(
                400,
                f"option '{key}' is not supported: {why}; remove it from the request",
                param=key,
                code="unsupported_option",
            )

    def bias(self, n_vocab: int) -> dict[int, float] | None:
        """``logit_bias`` as token id -> bias, checked against the vocabulary."""
        if not self.logit_bias:
            return None
        out: dict[int, float] = {}
        for k, v in self.logit_bias.items():
            if not k.lstrip("-").isdigit() or not 0 <= int(k) < n_vocab:
                raise APIError(
                    400, f"logit_bias key {k!r} is not a token id of this model (0..{n_vocab - 1})", param="logit_bias"
                )
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
                    raise APIError(
                        400,
                        f"messages[{i}].{key} is not supported by this server's chat format; remove it",
                        param=f"messages[{i}].{key}",
                        code="unsupported_option",
                    )

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
        for key in self.model_extra or {}:
            why = (
                "the embedding's size is the model's hidden size"
                if key == "dimensions"
                else "this server does not know this option"
            )
            raise APIError(
                400,
                f"option '{key}' is not supported: {why}; remove it from the request",
                param=key,
                code="unsupported_option",
            )


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
    """A rating (``response_id`` + ``rating``: "up" | "down" | 1..5) or a preference (``chosen_id``,
    ``rejected_id``)."""

    model_config = ConfigDict(extra="forbid")
    response_id: str | None = None
    rating: str | int | None = None
    chosen_id: str | None = None
    rejected_id: str | None = None
    comment: str | None = None

    @field_validator("rating", mode="before")
    @classmethod
    def _no_bool(cls, v: Any) -> Any:
        if isinstance(v, bool):  # JSON true is not one star
            raise ValueError("rating must be 'up', 'down' or an integer 1..5, not a boolean")
        return v

"""What every ``Ingress`` route does first: the FastAPI app the routes hang on (``api``, OpenAI-shaped errors) and
``IngressBase``, the request plumbing they share: auth and the per-key rate limit, the body read within its size
cap and parsed, the model name checked, ``max_tokens`` fitted to the context, a request's sampling options as engine
parameters, the memory namespace of a caller. ``serve.api`` composes ``Ingress`` from it and ``serve.state_routes``.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request

from serve.auth import authorize
from serve.errors import APIError, install_error_handlers
from serve.memory import MemoryStoreError
from serve.ratelimit import RateLimiter
from serve.schemas import parse_body

api = FastAPI(title="genloop", description="OpenAI-compatible API with RAG, memory and feedback")
install_error_handlers(api)


class IngressBase:
    """The request plumbing of ``serve.api.Ingress`` (which sets these attributes in its ``__init__``)."""

    cfg: Any  # serve.config.ServeConfig
    key_hashes: frozenset[str]
    limiter: RateLimiter
    name: str
    context_len: int
    stop_ids: list[int]
    tok: Any  # models.tokenizer.Tokenizer or models.hf_tokenizer.HFTokenizer

    # ---- request plumbing ------------------------------------------------------------------------------------------
    async def _begin(self, request: Request, model=None, *, rate_limited: bool = True):
        """Auth, rate limit, size cap and parsing: returns (caller key id, parsed body or None)."""
        caller = authorize(request.headers.get("authorization"), self.key_hashes)
        if rate_limited:
            who = caller if caller != "anon" else f"ip:{request.client.host if request.client else '?'}"
            wait = self.limiter.allow(who)
            if wait > 0:
                err = APIError(
                    429,
                    f"rate limit of {self.cfg.rate_limit_per_minute} requests/minute reached; retry in {wait:.1f}s",
                    code="rate_limit_exceeded",
                )
                err.retry_after = wait  # type: ignore[attr-defined]
                raise err
        if model is None:
            return caller, None
        return caller, parse_body(await self._body(request), model, self.cfg.max_body_bytes)

    async def _body(self, request: Request) -> bytes:
        """The request body, read no further than the size cap: a declared or streamed (chunked) body over
        ``max_body_bytes`` is a 413 without holding it all in memory."""
        cap = self.cfg.max_body_bytes
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > cap:
            raise APIError(413, f"request body is {length} bytes, over the limit of {cap}", code="request_too_large")
        raw = bytearray()
        async for part in request.stream():
            raw += part
            if len(raw) > cap:
                raise APIError(413, f"request body is over the limit of {cap} bytes", code="request_too_large")
        return bytes(raw)

    def _check_model(self, name: str) -> None:
        if name != self.name:
            raise APIError(
                404,
                f"model {name!r} does not exist; this server serves {self.name!r} (GET /v1/models)",
                param="model",
                code="model_not_found",
            )

    def _max_tokens(self, requested: int | None, prompt_len: int) -> int:
        n = self.cfg.default_max_tokens if requested is None else requested
        if n < 1:
            raise APIError(400, f"max_tokens must be >= 1, got {n}", param="max_tokens")
        if n > self.cfg.max_tokens_cap:
            raise APIError(
                400, f"max_tokens {n} is over this server's cap of {self.cfg.max_tokens_cap}", param="max_tokens"
            )
        if requested is None:  # default: shrink to fit, as long as at least one token fits
            n = min(n, self.context_len - prompt_len)
        if n < 1 or prompt_len + n > self.context_len:
            raise APIError(
                400,
                f"this model's context is {self.context_len} tokens; the prompt has {prompt_len} "
                f"and max_tokens is {max(n, 1)} ({prompt_len + max(n, 1)} in all); shorten the "
                "prompt or lower max_tokens",
                param="messages",
                code="context_length_exceeded",
            )
        return n

    def _params(self, req, max_tokens: int) -> dict[str, Any]:
        """``models.engine.streaming_params`` keyword args from a chat or completions request (options checked)."""
        req.check_options()
        rf = req.response_format
        if rf is not None and rf.type != "text" and not self.cfg.structured_outputs:
            raise APIError(
                400,
                "response_format is off on this server (serve.structured_outputs=false)",
                param="response_format",
                code="unsupported_option",
            )
        return dict(
            max_tokens=max_tokens,
            temperature=req.temperature,
            top_p=req.top_p,
            stop_token_ids=self.stop_ids,
            seed=req.seed,
            ignore_eos=req.ignore_eos,
            n=req.n,
            logprobs=req.top_logprobs_k(),
            top_k=req.top_k or -1,
            min_p=req.min_p,
            presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty,
            repetition_penalty=req.repetition_penalty,
            logit_bias=req.bias(self.tok.n_vocab),
            json_object=bool(rf and rf.type == "json_object"),
            json_schema=rf.schema() if rf else None,
        )

    def _namespace(self, caller: str, user: str | None) -> str:
        from serve.memory import namespace

        try:
            return namespace(caller, user or "")
        except MemoryStoreError as e:
            raise APIError(400, str(e), param="user") from None

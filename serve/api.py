"""The OpenAI-compatible HTTP API: the ``Ingress`` deployment (FastAPI under ``@serve.ingress``).

It tokenizes with the checkpoint's genloop tokenizer, renders chat with the checkpoint's template (``models.chat``),
enforces keys/limits, adds retrieved context, detokenizes the generator's token stream and records every response
for feedback. Chat and completions share one path (``_answer``) once the prompt ids are known. Errors a deployment
raises come back across the Ray handle wrapped by Ray; ``_call`` unwraps them, so a route answers them as the
domain error they are (404 unknown response, 400 bad rating, ...), not as a 500.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from typing import Any, AsyncIterator, Awaitable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve.config import ServeConfig, context_length
from serve.feedback import FeedbackError, NotFound, ResponseBatcher
from serve.knowledge import KnowledgeError
from serve.memory import MemoryStoreError
from serve.protocol import (APIError, ChatRequest, CompletionRequest, DocumentsRequest, FeedbackRequest, MemoryRequest,
                            RateLimiter, TextStream, authorize, error_body, parse_body)

log = logging.getLogger(__name__)


def unwrap(e: BaseException) -> BaseException:
    """The exception a deployment raised, out of Ray's wrappers (``RayTaskError`` and the like keep it as ``cause``)."""
    seen = 0
    while getattr(e, "cause", None) is not None and isinstance(e.cause, BaseException) and seen < 8:
        e, seen = e.cause, seen + 1
    return e


def as_api_error(e: BaseException) -> APIError | None:
    """A domain error from a deployment as the HTTP error it means; None for anything else (a real 500)."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, NotFound):
        return APIError(404, str(e), code="response_not_found")
    if isinstance(e, (FeedbackError, KnowledgeError, MemoryStoreError)):
        return APIError(400, str(e))
    return None


async def _call(response: Awaitable[Any]) -> Any:
    """Await a deployment call; its domain errors become their HTTP answers whatever Ray wrapped them in."""
    try:
        return await response
    except Exception as e:  # noqa: BLE001  (re-raised: as the API error it means, else as it was)
        err = as_api_error(unwrap(e))
        if err is None:
            raise
        raise err from None


api = FastAPI(title="genloop", description="OpenAI-compatible API with RAG, memory and feedback")


@api.exception_handler(APIError)
async def _api_error(request: Request, e: APIError) -> JSONResponse:
    headers = {"Retry-After": str(int(e.retry_after) + 1)} if getattr(e, "retry_after", None) else None
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
    err = (e.errors() or [{}])[0]
    loc = ".".join(str(x) for x in err.get("loc", ()))
    return JSONResponse(error_body(f"{loc}: {err.get('msg', 'invalid')}", "invalid_request_error", loc or None),
                        status_code=422)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
    typ = APIError.TYPES.get(e.status_code, "invalid_request_error")
    return JSONResponse(error_body(f"{request.method} {request.url.path}: {e.detail}", typ), status_code=e.status_code)


@api.exception_handler(Exception)
async def _server_error(request: Request, e: Exception) -> JSONResponse:
    log.exception("internal error on %s", request.url.path)
    return JSONResponse(error_body(f"internal error ({type(e).__name__}); the request was not completed",
                                   "server_error"), status_code=500)


def _sse(obj: dict) -> bytes:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n".encode()


@serve.deployment(name="Ingress")
@serve.ingress(api)
class Ingress:
    def __init__(self, generator, retriever, feedback, cfg: ServeConfig, key_hashes: frozenset[str] = frozenset()
                 ) -> None:
        from models.chat import ChatFormat
        from models.checkpoint import load_tokenizer
        from pipelines.artifacts import checkpoint_dir

        local = checkpoint_dir(cfg.model)  # a URI is downloaded once into this node's cache
        self.generator, self.retriever, self.feedback = generator, retriever, feedback
        self.gen_stream = generator.options(stream=True)  # one streaming handle, not one per request
        self.responses = ResponseBatcher(feedback.record_responses.remote)  # every response, for later feedback
        self.cfg, self.key_hashes = cfg, key_hashes
        self.tok = load_tokenizer(local)
        self.fmt = ChatFormat.from_checkpoint(local)
        self.context_len = context_length(cfg, local)
        self.name = cfg.served_name()
        self.stop_ids = [self.tok.eot_id, self.tok.im_end_id]
        self.limiter = RateLimiter(cfg.rate_limit_per_minute)
        self.created = int(time.time())

    async def __del__(self) -> None:
        """Ray Serve's graceful shutdown: the responses still pending go to the store."""
        try:
            await self.responses.flush()
        except Exception:
            log.exception("%d responses were not recorded for feedback at shutdown", len(self.responses.pending))

    # ---- request plumbing ------------------------------------------------------------------------------------------
    async def _begin(self, request: Request, model=None, *, rate_limited: bool = True):
        """Auth, rate limit, size cap and parsing: returns (caller key id, parsed body or None)."""
        caller = authorize(request.headers.get("authorization"), self.key_hashes)
        if rate_limited:
            who = caller if caller != "anon" else f"ip:{request.client.host if request.client else '?'}"
            wait = self.limiter.allow(who)
            if wait > 0:
                err = APIError(429, f"rate limit of {self.cfg.rate_limit_per_minute} requests/minute reached; retry "
                                    f"in {wait:.1f}s", code="rate_limit_exceeded")
                err.retry_after = wait  # type: ignore[attr-defined]
                raise err
        if model is None:
            return caller, None
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > self.cfg.max_body_bytes:
            raise APIError(413, f"request body is {length} bytes, over the limit of {self.cfg.max_body_bytes}",
                           code="request_too_large")
        return caller, parse_body(await request.body(), model, self.cfg.max_body_bytes)

    def _check_model(self, name: str) -> None:
        if name != self.name:
            raise APIError(404, f"model {name!r} does not exist; this server serves {self.name!r} (GET /v1/models)",
                           param="model", code="model_not_found")

    def _max_tokens(self, requested: int | None, prompt_len: int) -> int:
        n = self.cfg.default_max_tokens if requested is None else requested
        if n < 1:
            raise APIError(400, f"max_tokens must be >= 1, got {n}", param="max_tokens")
        if n > self.cfg.max_tokens_cap:
            raise APIError(400, f"max_tokens {n} is over this server's cap of {self.cfg.max_tokens_cap}",
                           param="max_tokens")
        if requested is None:  # default: shrink to fit, as long as at least one token fits
            n = min(n, self.context_len - prompt_len)
        if n < 1 or prompt_len + n > self.context_len:
            raise APIError(400, f"this model's context is {self.context_len} tokens; the prompt has {prompt_len} "
                                f"and max_tokens is {max(n, 1)} ({prompt_len + max(n, 1)} in all); shorten the "
                                "prompt or lower max_tokens", param="messages", code="context_length_exceeded")
        return n

    def _params(self, req, max_tokens: int) -> dict[str, Any]:
        return dict(max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p,
                    stop_token_ids=self.stop_ids, seed=req.seed, ignore_eos=req.ignore_eos)

    async def _run(self, prompt_ids: list[int], params: dict, rid: str, stream: TextStream
                   ) -> AsyncIterator[tuple[str, str | None]]:
        """(text delta, finish_reason) pieces; ends the engine request early when a stop string appears."""
        gen = self.gen_stream.generate.remote(prompt_ids, params, rid)
        finish = None
        try:
            async for new_ids, fin in gen:
                delta = stream.push(new_ids)
                if stream.stopped:
                    finish = "stop"
                    yield delta, None
                    break
                if fin is not None:
                    finish = "stop" if fin == "stop" else "length"
                if delta:
                    yield delta, None
        finally:
            if finish is None or stream.stopped:  # stop string, client gone or error: free the engine's slot
                gen.cancel()
        yield stream.flush(), finish

    # ---- routes ----------------------------------------------------------------------------------------------------
    @api.get("/health")
    async def health(self) -> dict:
        return {"status": "ok", "model": self.name}

    @api.get("/v1/models")
    async def models(self, request: Request) -> dict:
        await self._begin(request, rate_limited=False)
        return {"object": "list", "data": [{"id": self.name, "object": "model", "created": self.created,
                                            "owned_by": "genloop", "max_model_len": self.context_len}]}

    @api.post("/v1/chat/completions")
    async def chat(self, request: Request):
        from serve.retriever import augment

        caller, req = await self._begin(request, ChatRequest)
        self._check_model(req.model)
        if not req.messages:
            raise APIError(400, "messages is empty; send at least one message", param="messages")
        if req.n != 1:
            raise APIError(400, "only n=1 is supported", param="n")
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        plain_text = self.fmt.render(messages, add_generation_prompt=True)
        prompt_ids = self.tok.encode(plain_text, allow_special=True)
        max_tokens = self._max_tokens(req.max_completion_tokens or req.max_tokens, len(prompt_ids))
        docs: list[dict] = []
        n_facts = 0
        ns = self._namespace(caller, req.user) if req.user else None
        if req.rag or ns:
            query = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
            found = await _call(self.retriever.context.remote(query, ns, self.cfg.rag_top_k if req.rag else 0,
                                                              self.cfg.memory_top_k))
            prompt_ids, _, docs, n_facts = augment(self.tok, self.fmt, messages, found["passages"], found["facts"],
                                                   self.context_len - max_tokens)
        extra = {"rag": {"documents": [{"id": d["doc_id"], "title": d["title"]} for d in docs], "memories": n_facts}}
        return await self._answer(True, req, prompt_ids, max_tokens, extra, dict(prompt=plain_text, messages=messages))

    @api.post("/v1/completions")
    async def completions(self, request: Request):
        _, req = await self._begin(request, CompletionRequest)
        self._check_model(req.model)
        if req.n != 1:
            raise APIError(400, "only n=1 is supported", param="n")
        prompt = req.prompt_value()
        if isinstance(prompt, str):
            if not prompt:
                raise APIError(400, "prompt is empty", param="prompt")
            prompt_text, prompt_ids = prompt, self.tok.encode(prompt, allow_special=True)
        else:
            bad = [i for i in prompt if not 0 <= i < self.tok.n_vocab]
            if bad:
                raise APIError(400, f"prompt token id {bad[0]} is outside the vocabulary (0..{self.tok.n_vocab - 1})",
                               param="prompt")
            prompt_text, prompt_ids = self.tok.decode(prompt), list(prompt)
        max_tokens = self._max_tokens(req.max_tokens if req.max_tokens is not None else None, len(prompt_ids))
        return await self._answer(False, req, prompt_ids, max_tokens, {}, dict(prompt=prompt_text, messages=None))

    async def _answer(self, chat: bool, req: Any, prompt_ids: list[int], max_tokens: int, extra: dict, record: dict):
        """The path chat and completions share once the prompt ids are known: generate, stream (SSE) or collect,
        record the response for feedback, answer in the endpoint's OpenAI shape."""
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        obj = "chat.completion" if chat else "text_completion"
        stream = TextStream(self.tok, set(self.stop_ids), req.stops())
        params = self._params(req, max_tokens)
        if req.stream:
            return self._stream_response(rid, obj + ".chunk" if chat else obj, prompt_ids, params, stream, extra,
                                         record, bool(req.stream_options and req.stream_options.include_usage))
        text, finish = await self._collect(prompt_ids, params, rid, stream)
        self.responses.add(response_id=rid, model=self.name, response=text, **record)
        choice = {"index": 0, "logprobs": None, "finish_reason": finish}
        choice.update({"message": {"role": "assistant", "content": text}} if chat else {"text": text})
        return {"id": rid, "object": obj, "created": int(time.time()), "model": self.name, "choices": [choice],
                "usage": self._usage(len(prompt_ids), stream.n_generated), **extra}

    async def _collect(self, prompt_ids: list[int], params: dict, rid: str, stream: TextStream) -> tuple[str, str]:
        finish = "length"
        async for _, fin in self._run(prompt_ids, params, rid, stream):
            finish = fin or finish
        return stream.text, finish

    @staticmethod
    def _usage(n_prompt: int, n_completion: int) -> dict:
        return {"prompt_tokens": n_prompt, "completion_tokens": n_completion, "total_tokens": n_prompt + n_completion}

    def _stream_response(self, rid: str, obj: str, prompt_ids: list[int], params: dict, stream: TextStream,
                         extra: dict, record: dict, include_usage: bool) -> StreamingResponse:
        created = int(time.time())
        chat = obj == "chat.completion.chunk"

        def chunk(delta: str | None, finish: str | None, first: bool = False) -> dict:
            if chat:
                d: dict[str, Any] = {"role": "assistant", "content": delta or ""} if first else \
                    ({"content": delta} if delta else {})
                choice = {"index": 0, "delta": d, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": delta or "", "logprobs": None, "finish_reason": finish}
            out = {"id": rid, "object": obj, "created": created, "model": self.name, "choices": [choice]}
            if first:
                out.update(extra)
            return out

        async def events() -> AsyncIterator[bytes]:
            finish = None
            try:
                if chat:
                    yield _sse(chunk("", None, first=True))
                async for delta, fin in self._run(prompt_ids, params, rid, stream):
                    if fin is not None:
                        finish = fin
                    if delta:
                        yield _sse(chunk(delta, None))
                yield _sse(chunk(None, finish or "length"))
                if include_usage:
                    yield _sse({"id": rid, "object": obj, "created": created, "model": self.name, "choices": [],
                                "usage": self._usage(len(prompt_ids), stream.n_generated)})
                self.responses.add(response_id=rid, model=self.name, response=stream.text, **record)
            except asyncio.CancelledError:  # the client went away
                raise
            except Exception as e:  # after the 200 header: report in-band, as OpenAI does
                log.exception("stream %s failed", rid)
                yield _sse(error_body(f"generation failed ({type(e).__name__})", "server_error"))
            yield b"data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Request-Id": rid})

    # ---- knowledge, memory, feedback -------------------------------------------------------------------------------
    @api.post("/v1/documents")
    async def add_documents(self, request: Request) -> dict:
        _, req = await self._begin(request, DocumentsRequest)
        docs = req.docs()
        for d in docs:
            if len(d.text) > self.cfg.max_document_chars:
                raise APIError(413, f"document {d.id or d.title or ''!r} has {len(d.text)} characters, over the "
                                    f"limit of {self.cfg.max_document_chars}; split it", param="text",
                               code="document_too_large")
            if not d.text.strip():
                raise APIError(400, "document text is empty", param="text")
        added = await _call(self.retriever.add_documents.remote([d.model_dump() for d in docs]))
        return {"object": "list", "data": [dict(a, object="document") for a in added]}

    @api.get("/v1/documents/{doc_id:path}")
    async def get_document(self, doc_id: str, request: Request) -> dict:
        await self._begin(request)
        doc = await _call(self.retriever.get_document.remote(doc_id))
        if doc is None:
            raise APIError(404, f"no document {doc_id!r}", param="id", code="document_not_found")
        return dict(doc, object="document")

    @api.delete("/v1/documents/{doc_id:path}")
    async def delete_document(self, doc_id: str, request: Request) -> dict:
        await self._begin(request)
        if not await _call(self.retriever.delete_document.remote(doc_id)):
            raise APIError(404, f"no document {doc_id!r}", param="id", code="document_not_found")
        return {"id": doc_id, "object": "document", "deleted": True}

    def _namespace(self, caller: str, user: str | None) -> str:
        from serve.memory import namespace

        try:
            return namespace(caller, user or "")
        except MemoryStoreError as e:
            raise APIError(400, str(e), param="user") from None

    @api.post("/v1/memory")
    async def add_memory(self, request: Request) -> dict:
        caller, req = await self._begin(request, MemoryRequest)
        fact = await _call(self.retriever.add_fact.remote(self._namespace(caller, req.user), req.fact))
        return dict(fact, object="memory", user=req.user)

    @api.get("/v1/memory")
    async def list_memory(self, request: Request, user: str = "") -> dict:
        caller, _ = await self._begin(request)
        facts = await _call(self.retriever.list_facts.remote(self._namespace(caller, user)))
        return {"object": "list", "user": user, "data": [dict(f, object="memory") for f in facts]}

    @api.delete("/v1/memory/{fact_id}")
    async def delete_memory(self, fact_id: str, request: Request, user: str = "") -> dict:
        caller, _ = await self._begin(request)
        if not await _call(self.retriever.delete_fact.remote(self._namespace(caller, user), fact_id)):
            raise APIError(404, f"user {user!r} has no memory {fact_id!r}", param="id")
        return {"id": fact_id, "object": "memory", "deleted": True}

    @api.post("/v1/feedback")
    async def feedback(self, request: Request) -> dict:
        caller, req = await self._begin(request, FeedbackRequest)
        await self.responses.flush()  # the responses this replica served are in the store before it is asked
        if req.chosen_id is not None or req.rejected_id is not None:
            if req.chosen_id is None or req.rejected_id is None or req.rating is not None:
                raise APIError(400, "a preference needs both 'chosen_id' and 'rejected_id' (and no 'rating')")
            out = await _call(self.feedback.prefer.remote(req.chosen_id, req.rejected_id, who=caller))
        else:
            if req.response_id is None or req.rating is None:
                raise APIError(400, "send 'response_id' and 'rating' (up/down or 1..5), or 'chosen_id' and "
                                    "'rejected_id'")
            out = await _call(self.feedback.rate.remote(req.response_id, req.rating, who=caller))
        return dict(out, object="feedback")

"""``genloop serve``: a checkpoint behind OpenAI-compatible HTTP on Ray Serve, with RAG, memory and feedback.

Deployments composed with ``.bind()``::

    Ingress (FastAPI, @serve.ingress) ──► Generator (vLLM AsyncLLM, token ids in/out)
                                     ├──► Retriever (knowledge store: SQLite FTS5/BM25; per-user memory)
                                     └──► Feedback  (every response recorded; ratings and preferences; one writer)

Each has its own replica count or ``autoscaling_config`` and ``ray_actor_options`` (``serve.generator.*``,
``serve.retriever.*``, ``serve.ingress.*``, ``serve.feedback.*``), so the generator scales apart from the retriever. The ingress tokenizes
with the checkpoint's genloop tokenizer, renders chat with the checkpoint's template (``models.chat``), enforces
keys/limits, adds retrieved context, detokenizes the engine's token stream and records every response for feedback.

Routes: ``POST /v1/chat/completions``, ``POST /v1/completions`` (both ``stream: true`` as SSE ending in
``data: [DONE]``), ``GET /v1/models``, ``GET /health``, ``POST /v1/documents``, ``GET|DELETE /v1/documents/{id}``,
``POST|GET /v1/memory``, ``DELETE /v1/memory/{id}``, ``POST /v1/feedback``.

Security: with ``--api-key-file`` every ``/v1`` route needs ``Authorization: Bearer KEY``. Rate limit: a token bucket
per key **per ingress replica** (``rate_limit_per_minute``; R replicas admit up to R x the limit). Memory is scoped
to (API key, ``user``): one user never sees another's facts. Body size, document size and ``max_tokens`` are capped;
prompt + max_tokens beyond the context is a 400 with the numbers.

Cluster: ``serve deploy serve/serve_config.yaml`` deploys the same application through ``app_builder``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from models.checkpoint import resolve_checkpoint
from models.engine import EngineConfig
from serve.feedback import ResponseBatcher
from serve.protocol import (APIError, ChatRequest, CompletionRequest, DocumentsRequest, FeedbackRequest, MemoryRequest,
                            RateLimiter, TextStream, authorize, error_body, load_api_keys, parse_body)

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------------------
# config


# Ray Serve's own throughput settings (those of RAY_SERVE_THROUGHPUT_OPTIMIZED, minus direct ingress and gRPC
# transport, which change how clients and replicas connect): user code and the handle's router run on the replica's
# event loop instead of extra threads/loops, request-path logs are buffered. On a small CPU every thread hop per
# streamed piece costs; bench/serve_bench.py measures the difference (`serve.throughput_optimized=false`).
THROUGHPUT_ENV = {
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
    "RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": "1000",
    "RAY_SERVE_FREEZE_GC_ON_STARTUP": "1",
}


def direct_ingress_env(port: int) -> dict[str, str]:
    """Ray Serve direct ingress on ``port``: the ingress replica runs the HTTP server itself, so a request (and every
    streamed piece) skips the Serve proxy actor, one process hop less. The controller and replicas read these at
    import, so they must be in the environment before Ray starts. One port: one ingress replica per node."""
    return {
        "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
        "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(port),
        "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(port + 1),  # exclusive bound
        # no external load balancer has to notice a stopped replica, and a restarted app binds the same port again
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "1",
        "RAY_SERVE_PORT_QUARANTINE_S": "0",
    }


@dataclass
class DeploymentOptions:
    """One deployment's scale and resources. ``autoscaling`` (Ray Serve ``autoscaling_config``: min_replicas,
    max_replicas, target_ongoing_requests, ...) replaces ``num_replicas`` when set."""

    num_replicas: int = 1
    autoscaling: dict[str, Any] | None = None
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    max_ongoing_requests: int = 64

    def serve_options(self, env: dict[str, str] | None = None) -> dict[str, Any]:
        actor: dict[str, Any] = {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}
        if env:
            actor["runtime_env"] = {"env_vars": dict(env)}
        opts: dict[str, Any] = {"ray_actor_options": actor, "max_ongoing_requests": self.max_ongoing_requests}
        if self.autoscaling:
            opts["autoscaling_config"] = dict(self.autoscaling)
        else:
            opts["num_replicas"] = self.num_replicas
        return opts


@dataclass
class ServeConfig:
    model: str = ""  # checkpoint folder (Hugging Face format, written by a genloop training stage)
    model_name: str = ""  # the name clients send as "model"; default: the checkpoint folder's name
    knowledge: str = "runs/serve"  # knowledge store: a .db file, or a folder holding knowledge.db
    memory_db: str = ""  # default: memory.db next to the knowledge store
    feedback_db: str = ""  # default: feedback.db next to the knowledge store
    api_key_file: str = ""  # one key per line; empty: no authentication (loopback use)
    host: str = "127.0.0.1"
    port: int = 8000
    app_name: str = "genloop"
    route_prefix: str = "/"
    max_body_bytes: int = 1_000_000
    max_document_chars: int = 200_000
    max_tokens_cap: int = 1024  # largest max_tokens a request may ask for
    default_max_tokens: int = 128
    rate_limit_per_minute: int = 600  # per API key (or client address without keys), per ingress replica; 0: off
    access_log: bool = False  # Ray Serve's per-request log lines (costly on a small CPU)
    throughput_optimized: bool = True  # THROUGHPUT_ENV in every replica (and the proxy, when this starts Ray)
    # when `start` launches its own local Ray with one ingress replica: clients reach that replica's HTTP server on
    # `port` (Ray Serve direct ingress, no proxy hop); else (joining a cluster) the Serve proxy listens on `port`
    direct_ingress: bool = True
    stream_messages_per_s: float = 50.0  # per generator replica, shared by its streams (0: a message per step)
    max_stream_interval_ms: float = 250.0  # the longest a streamed piece waits for more tokens
    rag_top_k: int = 3
    memory_top_k: int = 3
    chunk_chars: int = 600
    chunk_overlap: int = 80
    engine: EngineConfig = field(default_factory=lambda: EngineConfig(max_num_seqs=32))
    generator: DeploymentOptions = field(default_factory=DeploymentOptions)
    retriever: DeploymentOptions = field(default_factory=lambda: DeploymentOptions(num_cpus=0.25))
    ingress: DeploymentOptions = field(default_factory=lambda: DeploymentOptions(num_cpus=0.25, max_ongoing_requests=256))
    feedback: DeploymentOptions = field(default_factory=lambda: DeploymentOptions(num_cpus=0.1, max_ongoing_requests=256))

    def served_name(self) -> str:
        return self.model_name or Path(self.model).name

    def state_paths(self) -> tuple[str, str, str]:
        """(knowledge, memory db, feedback db)."""
        from serve.knowledge import store_path

        base = store_path(self.knowledge).parent
        return (self.knowledge, self.memory_db or str(base / "memory.db"), self.feedback_db or str(base / "feedback.db"))


def check_config(cfg: ServeConfig) -> None:
    """Fail before starting anything when the checkpoint is missing or limits make no sense."""
    from models.checkpoint import load_config

    if not cfg.model:
        raise ValueError("no model: pass --model CHECKPOINT_DIR (a folder written by pretrain/sft/rlhf)")
    if not Path(cfg.model).is_dir():
        raise FileNotFoundError(f"checkpoint {cfg.model} does not exist; pass the folder a training stage wrote")
    load_config(resolve_checkpoint(cfg.model))
    if cfg.default_max_tokens < 1 or cfg.max_tokens_cap < cfg.default_max_tokens:
        raise ValueError(f"serve: need 1 <= default_max_tokens ({cfg.default_max_tokens}) <= max_tokens_cap "
                         f"({cfg.max_tokens_cap})")


def context_length(cfg: ServeConfig) -> int:
    from models.checkpoint import load_config

    n = load_config(resolve_checkpoint(cfg.model)).max_seq_len
    return min(n, cfg.engine.max_model_len) if cfg.engine.max_model_len else n


# ---------------------------------------------------------------------------------------------------------------
# generator deployment: vLLM's async engine


@serve.deployment(name="Generator")
class Generator:
    """Holds one vLLM ``AsyncLLM`` (CUDA build on GPUs, CPU build here); token ids in, token id deltas out."""

    def __init__(self, model: str, engine: EngineConfig, stream_messages_per_s: float = 0.0,
                 max_stream_interval_ms: float = 250.0) -> None:
        import os

        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # before vLLM's first import in this replica
        from models.engine import make_async_engine

        self.engine = make_async_engine(model, engine)
        self.rate = stream_messages_per_s
        self.max_interval = max_stream_interval_ms / 1000.0
        self.active = 0  # requests streaming now

    def _interval(self) -> float:
        """Seconds between a stream's pieces: the replica's message budget shared by its active streams."""
        return min(self.max_interval, self.active / self.rate) if self.rate > 0 else 0.0

    async def generate(self, prompt_ids: list[int], params: dict[str, Any], request_id: str
                       ) -> AsyncIterator[tuple[list[int], str | None]]:
        """Streams ``(new_ids, finish_reason)``; ``params`` are ``models.engine.streaming_params`` keyword args.

        Pieces are coalesced: the first goes out at once (time to first token), the last as soon as the request
        finishes, and in between each stream sends at most one piece per interval = active streams /
        ``stream_messages_per_s`` (capped at ``max_stream_interval_ms``): the engine's steps in between are merged.
        One stream alone sends nearly every token; 32 streams send a few tokens per piece, so the Ray messages per
        second stay bounded and the CPU goes to generating, not to moving single tokens between processes."""
        from models.engine import stream_ids, streaming_params

        queue: asyncio.Queue = asyncio.Queue()
        ended = asyncio.Event()

        async def pump() -> None:
            try:
                async for item in stream_ids(self.engine, prompt_ids, streaming_params(**params), request_id):
                    queue.put_nowait(item)
                queue.put_nowait(None)
            except Exception as e:  # noqa: BLE001  (re-raised in the consumer)
                queue.put_nowait(e)
            ended.set()

        task = asyncio.create_task(pump())
        self.active += 1
        try:
            done, first = False, True
            while not done:
                interval = self._interval()
                if not first and interval > 0 and not ended.is_set():
                    try:  # gather the steps of one interval; wake early when the request ends
                        await asyncio.wait_for(ended.wait(), interval)
                    except asyncio.TimeoutError:
                        pass
                items = [await queue.get()]
                while not queue.empty():
                    items.append(queue.get_nowait())
                ids: list[int] = []
                finish = None
                for it in items:
                    if it is None:
                        done = True
                    elif isinstance(it, Exception):
                        raise it
                    else:
                        ids += it[0]
                        finish = it[1] or finish
                if ids or finish:
                    first = False
                    yield ids, finish
        finally:
            self.active -= 1
            task.cancel()  # consumer gone or done: cancelling the pump aborts the request in vLLM

    async def check_health(self) -> None:
        await self.engine.check_health()

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()


# ---------------------------------------------------------------------------------------------------------------
# ingress: the OpenAI-compatible HTTP API

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

        self.generator, self.retriever, self.feedback = generator, retriever, feedback
        self.gen_stream = generator.options(stream=True)  # one streaming handle, not one per request
        self.responses = ResponseBatcher(feedback.record_responses.remote)  # every response, for later feedback
        self.cfg, self.key_hashes = cfg, key_hashes
        self.tok = load_tokenizer(cfg.model)
        self.fmt = ChatFormat.from_checkpoint(cfg.model)
        self.context_len = context_length(cfg)
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
            found = await self.retriever.context.remote(query, ns, self.cfg.rag_top_k if req.rag else 0,
                                                        self.cfg.memory_top_k)
            prompt_ids, _, docs, n_facts = augment(self.tok, self.fmt, messages, found["passages"], found["facts"],
                                                   self.context_len - max_tokens)
        rid = "chatcmpl-" + uuid.uuid4().hex
        extra = {"rag": {"documents": [{"id": d["doc_id"], "title": d["title"]} for d in docs], "memories": n_facts}}
        stream = TextStream(self.tok, set(self.stop_ids), req.stops())
        params = self._params(req, max_tokens)
        record = dict(prompt=plain_text, messages=messages)
        if req.stream:
            return self._stream_response(rid, "chat.completion.chunk", prompt_ids, params, stream, extra, record,
                                         bool(req.stream_options and req.stream_options.include_usage))
        text, finish = await self._collect(prompt_ids, params, rid, stream)
        self.responses.add(response_id=rid, model=self.name, response=text, **record)
        return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": self.name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                             "finish_reason": finish}],
                "usage": self._usage(len(prompt_ids), stream.n_generated), **extra}

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
        rid = "cmpl-" + uuid.uuid4().hex
        stream = TextStream(self.tok, set(self.stop_ids), req.stops())
        params = self._params(req, max_tokens)
        record = dict(prompt=prompt_text, messages=None)
        if req.stream:
            return self._stream_response(rid, "text_completion", prompt_ids, params, stream, {}, record,
                                         bool(req.stream_options and req.stream_options.include_usage))
        text, finish = await self._collect(prompt_ids, params, rid, stream)
        self.responses.add(response_id=rid, model=self.name, response=text, **record)
        return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": self.name,
                "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}],
                "usage": self._usage(len(prompt_ids), stream.n_generated)}

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
        added = await self.retriever.add_documents.remote([d.model_dump() for d in docs])
        return {"object": "list", "data": [dict(a, object="document") for a in added]}

    @api.get("/v1/documents/{doc_id:path}")
    async def get_document(self, doc_id: str, request: Request) -> dict:
        await self._begin(request)
        doc = await self.retriever.get_document.remote(doc_id)
        if doc is None:
            raise APIError(404, f"no document {doc_id!r}", param="id", code="document_not_found")
        return dict(doc, object="document")

    @api.delete("/v1/documents/{doc_id:path}")
    async def delete_document(self, doc_id: str, request: Request) -> dict:
        await self._begin(request)
        if not await self.retriever.delete_document.remote(doc_id):
            raise APIError(404, f"no document {doc_id!r}", param="id", code="document_not_found")
        return {"id": doc_id, "object": "document", "deleted": True}

    def _namespace(self, caller: str, user: str | None) -> str:
        from serve.memory import MemoryStoreError, namespace

        try:
            return namespace(caller, user or "")
        except MemoryStoreError as e:
            raise APIError(400, str(e), param="user") from None

    @api.post("/v1/memory")
    async def add_memory(self, request: Request) -> dict:
        from serve.memory import MemoryStoreError

        caller, req = await self._begin(request, MemoryRequest)
        try:
            fact = await self.retriever.add_fact.remote(self._namespace(caller, req.user), req.fact)
        except MemoryStoreError as e:
            raise APIError(400, str(e), param="fact") from None
        return dict(fact, object="memory", user=req.user)

    @api.get("/v1/memory")
    async def list_memory(self, request: Request, user: str = "") -> dict:
        caller, _ = await self._begin(request)
        facts = await self.retriever.list_facts.remote(self._namespace(caller, user))
        return {"object": "list", "user": user, "data": [dict(f, object="memory") for f in facts]}

    @api.delete("/v1/memory/{fact_id}")
    async def delete_memory(self, fact_id: str, request: Request, user: str = "") -> dict:
        caller, _ = await self._begin(request)
        if not await self.retriever.delete_fact.remote(self._namespace(caller, user), fact_id):
            raise APIError(404, f"user {user!r} has no memory {fact_id!r}", param="id")
        return {"id": fact_id, "object": "memory", "deleted": True}

    @api.post("/v1/feedback")
    async def feedback(self, request: Request) -> dict:
        from serve.feedback import FeedbackError, NotFound

        caller, req = await self._begin(request, FeedbackRequest)
        await self.responses.flush()  # the responses this replica served are in the store before it is asked
        try:
            if req.chosen_id is not None or req.rejected_id is not None:
                if req.chosen_id is None or req.rejected_id is None or req.rating is not None:
                    raise APIError(400, "a preference needs both 'chosen_id' and 'rejected_id' (and no 'rating')")
                out = await self.feedback.prefer.remote(req.chosen_id, req.rejected_id, who=caller)
            else:
                if req.response_id is None or req.rating is None:
                    raise APIError(400, "send 'response_id' and 'rating' (up/down or 1..5), or 'chosen_id' and "
                                        "'rejected_id'")
                out = await self.feedback.rate.remote(req.response_id, req.rating, who=caller)
        except NotFound as e:
            raise APIError(404, str(e), code="response_not_found") from None
        except FeedbackError as e:
            raise APIError(400, str(e)) from None
        return dict(out, object="feedback")


# ---------------------------------------------------------------------------------------------------------------
# composition


def build_app(cfg: ServeConfig):
    """The bound application: Ingress(Generator, Retriever), each with its own options."""
    from serve.feedback import FeedbackServer
    from serve.retriever import RetrieverServer

    check_config(cfg)
    # replicas may run elsewhere (another cwd or node): hand them absolute paths
    knowledge, memory_db, feedback_db = (str(Path(p).resolve()) for p in cfg.state_paths())
    cfg = replace(cfg, model=str(Path(resolve_checkpoint(cfg.model)).resolve()), model_name=cfg.served_name(),
                  knowledge=knowledge,
                  memory_db=memory_db, feedback_db=feedback_db)
    keys = load_api_keys(cfg.api_key_file) if cfg.api_key_file else frozenset()
    env = THROUGHPUT_ENV if cfg.throughput_optimized else None
    generator = Generator.options(**cfg.generator.serve_options(env)).bind(cfg.model, cfg.engine, cfg.stream_messages_per_s,
                                                                     cfg.max_stream_interval_ms)
    retriever = RetrieverServer.options(**cfg.retriever.serve_options(env)).bind(
        knowledge, memory_db, cfg.chunk_chars, cfg.chunk_overlap, cfg.max_document_chars)
    feedback = FeedbackServer.options(**cfg.feedback.serve_options(env)).bind(feedback_db)
    return Ingress.options(**cfg.ingress.serve_options(env)).bind(generator, retriever, feedback, cfg, keys)


def app_builder(args: dict[str, Any]):
    """Ray Serve application builder for ``serve deploy`` / ``serve run serve.app:app_builder config=demo ...``:
    ``args`` are ``config`` (preset or YAML) plus ServeConfig keys (dotted keys allowed)."""
    from pipelines.config import build_config

    args = dict(args or {})
    preset = args.pop("config", None)
    return build_app(build_config(ServeConfig, "serve", preset, args))


def use_direct_ingress(cfg: ServeConfig, address: str | None) -> bool:
    """Direct ingress needs the environment in place before Ray starts (so: a local Ray this process starts) and
    one ingress replica (one port)."""
    import os

    import ray

    if not cfg.direct_ingress:
        return False
    if address or os.environ.get("RAY_ADDRESS") or ray.is_initialized():
        log.info("direct ingress off: joining a running Ray, whose Serve proxy listens on port %d", cfg.port)
        return False
    if cfg.ingress.autoscaling or cfg.ingress.num_replicas != 1:
        log.info("direct ingress off: %s ingress replicas share port %d through the Serve proxy",
                 "autoscaled" if cfg.ingress.autoscaling else cfg.ingress.num_replicas, cfg.port)
        return False
    return True


def spare_port(host: str) -> int:
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def start(cfg: ServeConfig, address: str | None = None, blocking: bool = False) -> str:
    """Start (or join) Ray and Serve, deploy the app; returns its base URL (``cfg.host:cfg.port``).

    Starting a local Ray with ``cfg.direct_ingress`` and one ingress replica, the ingress replica itself listens on
    ``cfg.port`` (the Serve proxy takes a spare port); otherwise the Serve proxy listens on ``cfg.port``."""
    import os

    import ray

    from cluster.runtime import init_ray

    app = build_app(cfg)
    proxy_port = cfg.port
    if use_direct_ingress(cfg, address):
        os.environ.update(direct_ingress_env(cfg.port))  # the local Ray started below inherits them
        proxy_port = spare_port(cfg.host)
        log.info("direct ingress: the ingress replica serves %s:%d, the Serve proxy %s:%d", cfg.host, cfg.port,
                 cfg.host, proxy_port)
    if cfg.throughput_optimized and not ray.is_initialized():
        for k, v in THROUGHPUT_ENV.items():  # reaches the Serve proxy of the local Ray started below
            os.environ.setdefault(k, v)
    init_ray(address)
    serve.start(http_options={"host": cfg.host, "port": proxy_port})
    serve.run(app, name=cfg.app_name, route_prefix=cfg.route_prefix, blocking=blocking,
              logging_config={"enable_access_log": cfg.access_log, "log_level": "INFO" if cfg.access_log else "WARNING"})
    return f"http://{cfg.host}:{cfg.port}{cfg.route_prefix.rstrip('/')}"

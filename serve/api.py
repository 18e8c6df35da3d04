"""The OpenAI-compatible HTTP API: the ``Ingress`` deployment (FastAPI under ``@serve.ingress``).

It tokenizes with the checkpoint's genloop tokenizer, renders chat with the checkpoint's template (``models.chat``),
enforces keys/limits, adds retrieved context, detokenizes the generator's token stream and records every response
for feedback. Chat and completions share one path (``_answer``) once the prompt ids are known; every answer (whole
or streamed chunk), ``/v1/models`` and the feedback record name the model version that produced it, and
``POST /admin/models`` (admin key) switches every generator replica to a new checkpoint in place
(``serve.versions.VersionSwitch``). Errors a deployment raises come back across the Ray handle wrapped by Ray;
``_call`` (``serve.errors``) unwraps them, so a route answers them as the domain error they are (404 unknown
response, 400 bad rating, ...), not as a 500.

The parts this module composes: ``serve.ingress_base`` (the FastAPI app and the request plumbing every route
shares: keys, rate limit, body size, ``max_tokens``, options), ``serve.state_routes`` (the admin switch, documents,
memory and feedback routes), ``serve.retriever`` (retrieved passages in the prompt), ``serve.answers`` /
``serve.detokenize`` (token ids -> OpenAI answers), ``serve.errors`` (OpenAI-shaped errors).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from typing import Any, AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve

from serve.answers import Answer
from serve.config import ServeConfig, context_length
from serve.errors import APIError, as_api_error, error_body, unwrap
from serve.errors import call as _call
from serve.feedback import ResponseBatcher
from serve.ingress_base import api
from serve.ratelimit import RateLimiter
from serve.schemas import ChatRequest, CompletionRequest, EmbeddingRequest
from serve.state_routes import StateRoutes
from serve.versions import VersionSwitch

log = logging.getLogger(__name__)


def _sse(obj: dict) -> bytes:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n".encode()


@serve.deployment(name="Ingress")
@serve.ingress(api)
class Ingress(StateRoutes):
    def __init__(
        self,
        generator,
        retriever,
        feedback,
        cfg: ServeConfig,
        key_hashes: frozenset[str] = frozenset(),
        admin_hashes: frozenset[str] = frozenset(),
        deployment_id: str = "",
    ) -> None:
        from models.chat import ChatFormat
        from models.checkpoint import load_tokenizer
        from pipelines.artifacts import checkpoint_dir

        local = checkpoint_dir(cfg.model)  # a URI is downloaded once into this node's cache
        self.generator, self.retriever, self.feedback = generator, retriever, feedback
        self.gen_stream = generator.options(stream=True)  # one streaming handle, not one per request
        self.responses = ResponseBatcher(feedback.record_responses.remote)  # every response, for later feedback
        self.cfg, self.key_hashes, self.admin_hashes = cfg, key_hashes, admin_hashes
        self.local = local  # the checkpoint the app started with: a switch keeps its tokenizer and architecture
        self.app_name, self.deployment_id = serve.get_replica_context().app_name, deployment_id
        from serve.live import live_board, record_live
        from serve.versions import running_replicas

        self.live_board = live_board(self.app_name)  # which checkpoint a switch made live (serve.live)
        self.versions = VersionSwitch(
            generator,
            local,
            record=lambda model, version: record_live(self.live_board, deployment_id, model, version),
            running=lambda: running_replicas(self.app_name, "Generator"),
        )
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

    async def _start(self, prompt_ids: list[int], params: dict, rid: str):
        """Start generating: (model version, first piece or None, the rest of the stream). Waits until the engine
        produced its first piece, so that a request it refuses is a 400 before any response header."""
        gen = self.gen_stream.generate.remote(prompt_ids, params, rid)
        try:
            version = await gen.__anext__()
            try:
                first = await gen.__anext__()
            except StopAsyncIteration:
                first = None
        except BaseException as e:
            gen.cancel()
            err = as_api_error(unwrap(e)) if isinstance(e, Exception) else None
            if err is not None:
                raise err from None
            raise
        return version, first, gen

    async def _steps(self, answer: Answer, first, gen) -> AsyncIterator[list]:
        """The answer's steps piece by piece; ends the engine request early when stop strings ended every choice,
        or when the consumer stops (client gone, error)."""
        exhausted = first is None
        try:
            if first is not None:
                yield answer.push(first)
            while not answer.done:
                try:
                    piece = await gen.__anext__()
                except StopAsyncIteration:
                    exhausted = True
                    break
                steps = answer.push(piece)
                if steps:
                    yield steps
        finally:
            if not exhausted:
                gen.cancel()
        rest = answer.close()
        if rest:
            yield rest

    def _record(self, rid: str, version: str, answer: Answer, record: dict) -> None:
        """Every choice goes to the feedback store: choice 0 as the response id, choice i > 0 as ``<id>.<i>``."""
        for i, text in enumerate(answer.texts()):
            self.responses.add(
                response_id=rid if i == 0 else f"{rid}.{i}",
                model=self.name,
                response=text,
                model_version=version,
                **record,
            )

    # ---- routes ----------------------------------------------------------------------------------------------------
    @api.get("/health")
    async def health(self) -> dict:
        return {"status": "ok", "model": self.name}

    @api.get("/v1/models")
    async def models(self, request: Request) -> dict:
        await self._begin(request, rate_limited=False)
        live = await _call(self.generator.info.remote())
        return {
            "object": "list",
            "data": [
                {
                    "id": self.name,
                    "object": "model",
                    "created": self.created,
                    "owned_by": "genloop",
                    "max_model_len": self.context_len,
                    "model_version": live["model_version"],
                }
            ],
        }

    @api.post("/v1/chat/completions")
    async def chat(self, request: Request):
        from serve.retriever import augment

        caller, req = await self._begin(request, ChatRequest)
        self._check_model(req.model)
        if not req.messages:
            raise APIError(400, "messages is empty; send at least one message", param="messages")
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        plain_text = self.fmt.render(messages, add_generation_prompt=True)
        prompt_ids = self.tok.encode(plain_text, allow_special=True)
        max_tokens = self._max_tokens(req.max_completion_tokens or req.max_tokens, len(prompt_ids))
        params = self._params(req, max_tokens)
        docs: list[dict] = []
        n_facts = 0
        ns = self._namespace(caller, req.user) if req.user else None
        if req.rag or ns:
            query = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
            found = await _call(
                self.retriever.context.remote(query, ns, self.cfg.rag_top_k if req.rag else 0, self.cfg.memory_top_k)
            )
            prompt_ids, _, docs, n_facts = augment(
                self.tok, self.fmt, messages, found["passages"], found["facts"], self.context_len - max_tokens
            )
        extra = {"rag": {"documents": [{"id": d["doc_id"], "title": d["title"]} for d in docs], "memories": n_facts}}
        return await self._answer(True, req, prompt_ids, params, extra, dict(prompt=plain_text, messages=messages))

    @api.post("/v1/completions")
    async def completions(self, request: Request):
        _, req = await self._begin(request, CompletionRequest)
        self._check_model(req.model)
        prompt = req.prompt_value()
        if isinstance(prompt, str):
            if not prompt:
                raise APIError(400, "prompt is empty", param="prompt")
            prompt_text, prompt_ids = prompt, self.tok.encode(prompt, allow_special=True)
        else:
            bad = [i for i in prompt if not 0 <= i < self.tok.n_vocab]
            if bad:
                raise APIError(
                    400,
                    f"prompt token id {bad[0]} is outside the vocabulary (0..{self.tok.n_vocab - 1})",
                    param="prompt",
                )
            prompt_text, prompt_ids = self.tok.decode(prompt), list(prompt)
        max_tokens = self._max_tokens(req.max_tokens if req.max_tokens is not None else None, len(prompt_ids))
        params = self._params(req, max_tokens)
        return await self._answer(False, req, prompt_ids, params, {}, dict(prompt=prompt_text, messages=None))

    async def _answer(self, chat: bool, req: Any, prompt_ids: list[int], params: dict, extra: dict, record: dict):
        """The path chat and completions share once the prompt ids are known: generate, stream (SSE) or collect,
        record the response for feedback, answer in the endpoint's OpenAI shape with the model version."""
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        obj = "chat.completion" if chat else "text_completion"
        if params["n"] > 1 and params["temperature"] == 0:  # greedy: n copies of one answer (vLLM refuses n > 1)
            params["n"] = 1
        answer = Answer(
            self.tok, self.stop_ids, req.stops(), req.n, chat, params["logprobs"] is not None, copies=params["n"] == 1
        )
        version, first, gen = await self._start(prompt_ids, params, rid)
        if req.stream:
            return self._stream_response(
                rid,
                obj + ".chunk" if chat else obj,
                prompt_ids,
                answer,
                version,
                first,
                gen,
                extra,
                record,
                bool(req.stream_options and req.stream_options.include_usage),
            )
        async for _ in self._steps(answer, first, gen):
            pass
        self._record(rid, version, answer, record)
        return JSONResponse(
            {
                "id": rid,
                "object": obj,
                "created": int(time.time()),
                "model": self.name,
                "model_version": version,
                "choices": answer.choices(),
                "usage": self._usage(len(prompt_ids), answer.n_generated()),
                **extra,
            },
            headers={"X-Model-Version": version},
        )

    @staticmethod
    def _usage(n_prompt: int, n_completion: int) -> dict:
        return {"prompt_tokens": n_prompt, "completion_tokens": n_completion, "total_tokens": n_prompt + n_completion}

    def _stream_response(
        self,
        rid: str,
        obj: str,
        prompt_ids: list[int],
        answer: Answer,
        version: str,
        first,
        gen,
        extra: dict,
        record: dict,
        include_usage: bool,
    ) -> StreamingResponse:
        created = int(time.time())
        head = {"id": rid, "object": obj, "created": created, "model": self.name, "model_version": version}

        def chunk(choice: dict, with_extra: bool = False) -> bytes:
            return _sse({**head, "choices": [choice], **(extra if with_extra else {})})

        async def events() -> AsyncIterator[bytes]:
            opened = answer.first_chunks()
            for i, c in enumerate(opened):
                yield chunk(c, with_extra=i == 0)
            sent_extra = bool(opened)
            try:
                async for steps in self._steps(answer, first, gen):
                    for step in steps:
                        for c in answer.chunk_choices(step):
                            yield chunk(c, with_extra=not sent_extra)
                            sent_extra = True
                if include_usage:
                    yield _sse({**head, "choices": [], "usage": self._usage(len(prompt_ids), answer.n_generated())})
                self._record(rid, version, answer, record)
            except asyncio.CancelledError:  # the client went away
                raise
            except Exception as e:  # after the 200 header: report in-band, as OpenAI does
                log.exception("stream %s failed", rid)
                yield _sse(error_body(f"generation failed ({type(e).__name__})", "server_error"))
            yield b"data: [DONE]\n\n"

        return StreamingResponse(
            events(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Request-Id": rid, "X-Model-Version": version},
        )

    @api.post("/v1/embeddings")
    async def embeddings(self, request: Request) -> dict:
        _, req = await self._begin(request, EmbeddingRequest)
        req.check_options()
        self._check_model(req.model)
        if self.cfg.embeddings_from == "retriever":  # the trained retriever (serve.rag_embedder) embeds text
            got = await _call(self.retriever.embed.remote(self._embedding_texts(req.input)))
            version, vectors, n = got["identity"], got["vectors"], got["tokens"]
        else:
            inputs = self._embedding_inputs(req.input)
            version, vectors = await _call(self.generator.embed.remote(inputs, self.cfg.embedding_pooling))
            n = sum(len(x) for x in inputs)
        if req.encoding_format == "base64":
            import base64

            import numpy as np

            data = [base64.b64encode(np.asarray(v, dtype=np.float32).tobytes()).decode() for v in vectors]
        else:
            data = vectors
        return {
            "object": "list",
            "model": self.name,
            "model_version": version,
            "data": [{"object": "embedding", "index": i, "embedding": e} for i, e in enumerate(data)],
            "usage": {"prompt_tokens": n, "total_tokens": n},
        }

    def _embedding_texts(self, inp) -> list[str]:
        """``input`` (str or [str]) for the retriever's embedder; token ids are the served model's, so refused."""
        texts = [inp] if isinstance(inp, str) else inp
        if not texts:
            raise APIError(400, "input is empty", param="input")
        if not all(isinstance(x, str) for x in texts):
            raise APIError(
                400,
                "this server's embeddings come from its retriever (serve.embeddings_from=retriever), which reads "
                "text: send strings, not token ids",
                param="input",
            )
        if len(texts) > self.cfg.max_embedding_inputs:
            raise APIError(
                400,
                f"input has {len(texts)} items, over this server's limit of {self.cfg.max_embedding_inputs} per "
                "request",
                param="input",
            )
        for j, t in enumerate(texts):
            if not t:
                raise APIError(400, f"input[{j}] is empty", param="input")
        return texts

    def _embedding_inputs(self, inp) -> list[list[int]]:
        """``input`` (str, [str], [int] or [[int]]) as token-id lists, each non-empty and within the context."""
        if isinstance(inp, str):
            inp = [inp]
        if not inp:
            raise APIError(400, "input is empty", param="input")
        if all(isinstance(x, int) for x in inp):
            inp = [inp]
        if len(inp) > self.cfg.max_embedding_inputs:
            raise APIError(
                400,
                f"input has {len(inp)} items, over this server's limit of {self.cfg.max_embedding_inputs} per request",
                param="input",
            )
        out = []
        for j, x in enumerate(inp):
            ids = self.tok.encode(x) if isinstance(x, str) else list(x)
            if not ids:
                raise APIError(400, f"input[{j}] is empty", param="input")
            if any(not 0 <= i < self.tok.n_vocab for i in ids):
                raise APIError(
                    400,
                    f"input[{j}] holds a token id outside the vocabulary (0..{self.tok.n_vocab - 1})",
                    param="input",
                )
            if len(ids) > self.context_len:
                raise APIError(
                    400,
                    f"input[{j}] has {len(ids)} tokens; this model's context is {self.context_len}",
                    param="input",
                    code="context_length_exceeded",
                )
            out.append(ids)
        return out

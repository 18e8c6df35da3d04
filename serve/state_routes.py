"""The ``Ingress`` routes around the model: switching the served checkpoint (``POST /admin/models``, and
``deploy_model`` for a caller holding a Ray handle), knowledge documents (``/v1/documents``: added, read, deleted;
an added document is searched by the very next request), per-user memory (``/v1/memory``) and feedback
(``POST /v1/feedback``: ratings and preferences of recorded responses). Each forwards to its deployment (the
retriever, the feedback store, ``serve.versions.VersionSwitch``) after the shared plumbing (``serve.ingress_base``).
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import Request

from serve.auth import authorize_admin
from serve.errors import APIError, as_api_error
from serve.errors import call as _call
from serve.feedback import ResponseBatcher
from serve.ingress_base import IngressBase, api
from serve.schemas import AdminModelRequest, DocumentsRequest, FeedbackRequest, MemoryRequest, parse_body
from serve.versions import SwitchError, VersionSwitch

log = logging.getLogger(__name__)


class StateRoutes(IngressBase):
    """Routes of ``serve.api.Ingress`` that change or read state beside the model (set in its ``__init__``)."""

    retriever: Any
    feedback: Any
    responses: ResponseBatcher
    versions: VersionSwitch
    admin_hashes: frozenset[str]

    # ---- model versions --------------------------------------------------------------------------------------------
    @api.post("/admin/models")
    async def admin_models(self, request: Request) -> dict:
        """Switch the application to another checkpoint (``{"model": ABSOLUTE_PATH_OR_URI}``), in place."""
        authorize_admin(request.headers.get("authorization"), self.admin_hashes)
        req = parse_body(await self._body(request), AdminModelRequest, self.cfg.max_body_bytes)
        return await self._switch(req.model)

    async def deploy_model(self, model: str) -> dict:
        """``POST /admin/models`` for a caller holding a Ray handle (``genloop deploy --address``): the switch's
        result, or ``{"error": OpenAI error body, "status": HTTP status}`` (the API error does not cross Ray)."""
        try:
            return await self._switch(model)
        except APIError as e:
            return {"error": e.body()["error"], "status": e.status}

    async def _switch(self, model: str) -> dict:
        """Switch every generator replica in place (``serve.versions.VersionSwitch``: checked here, then each replica
        drains, reloads and resumes; when one fails the others are switched back and the old version keeps
        serving); a refused switch answers as its HTTP error."""
        try:
            return await self.versions.switch(model)
        except SwitchError as e:
            raise as_api_error(e) from None

    # ---- knowledge, memory, feedback -------------------------------------------------------------------------------
    @api.post("/v1/documents")
    async def add_documents(self, request: Request) -> dict:
        _, req = await self._begin(request, DocumentsRequest)
        docs = req.docs()
        for d in docs:
            if len(d.text) > self.cfg.max_document_chars:
                raise APIError(
                    413,
                    f"document {d.id or d.title or ''!r} has {len(d.text)} characters, over the "
                    f"limit of {self.cfg.max_document_chars}; split it",
                    param="text",
                    code="document_too_large",
                )
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
        try:  # the responses this replica served are in the store before it is asked
            await self.responses.flush()
        except Exception:  # noqa: BLE001  (kept for the next flush; the rating is still asked, never a 500 here)
            log.exception("recording %d responses before a rating failed", len(self.responses.pending))
        if req.chosen_id is not None or req.rejected_id is not None:
            if req.chosen_id is None or req.rejected_id is None or req.rating is not None:
                raise APIError(400, "a preference needs both 'chosen_id' and 'rejected_id' (and no 'rating')")
            out = await _call(self.feedback.prefer.remote(req.chosen_id, req.rejected_id, who=caller))
        else:
            if req.response_id is None or req.rating is None:
                raise APIError(
                    400, "send 'response_id' and 'rating' (up/down or 1..5), or 'chosen_id' and 'rejected_id'"
                )
            out = await _call(self.feedback.rate.remote(req.response_id, req.rating, who=caller))
        return dict(out, object="feedback")

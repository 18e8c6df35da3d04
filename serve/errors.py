"""Errors at the HTTP edge. ``APIError`` is an error in OpenAI's shape (``{"error": {"message", "type", "param",
"code"}}``) with its HTTP status. A deployment's domain errors come back across the Ray handle wrapped by Ray;
``unwrap`` and ``as_api_error`` turn them into the HTTP answer they mean (404 unknown response, 400 bad rating, 409
incompatible checkpoint, ...), not a 500; ``install_error_handlers`` renders every error of the FastAPI app in
OpenAI's shape. No Ray import at module level (the request schemas import ``APIError`` and stay Ray-free)."""

from __future__ import annotations

import logging
from typing import Any, Awaitable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)


class APIError(Exception):
    """An error the client caused (or 5xx); rendered as OpenAI's error body with ``status``."""

    TYPES = {
        400: "invalid_request_error",
        401: "authentication_error",
        403: "permission_error",
        404: "not_found_error",
        409: "invalid_request_error",
        413: "invalid_request_error",
        422: "invalid_request_error",
        429: "rate_limit_error",
        503: "server_error",
    }

    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None, type: str | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or self.TYPES.get(status, "server_error")

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


class ServeError(ValueError):
    """A domain error a deployment raises on purpose (bad feedback, a bad document, a refused switch): the HTTP answer
    it means is ``status`` (default 400) with ``code`` and ``param``. The stores and the version switch subclass it,
    so this module needs none of them."""

    status: int = 400
    code: str | None = None
    param: str | None = None


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


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
    if isinstance(e, ServeError):
        return APIError(e.status, str(e), param=e.param, code=e.code)
    if type(e).__name__ == "VLLMValidationError":  # the engine refused the request's parameters
        return APIError(400, f"the engine refused the request: {e}")
    return None


async def call(response: Awaitable[Any]) -> Any:
    """Await a deployment call; its domain errors become their HTTP answers whatever Ray wrapped them in."""
    try:
        return await response
    except Exception as e:  # noqa: BLE001  (re-raised: as the API error it means, else as it was)
        err = as_api_error(unwrap(e))
        if err is None:
            raise
        raise err from None


def install_error_handlers(api: FastAPI) -> None:
    @api.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError) -> JSONResponse:
        headers = {"Retry-After": str(int(e.retry_after) + 1)} if getattr(e, "retry_after", None) else None
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    @api.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
        err = (e.errors() or [{}])[0]
        loc = ".".join(str(x) for x in err.get("loc", ()))
        return JSONResponse(
            error_body(f"{loc}: {err.get('msg', 'invalid')}", "invalid_request_error", loc or None), status_code=422
        )

    @api.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        typ = APIError.TYPES.get(e.status_code, "invalid_request_error")
        return JSONResponse(
            error_body(f"{request.method} {request.url.path}: {e.detail}", typ), status_code=e.status_code
        )

    @api.exception_handler(Exception)
    async def _server_error(request: Request, e: Exception) -> JSONResponse:
        log.exception("internal error on %s", request.url.path)
        return JSONResponse(
            error_body(f"internal error ({type(e).__name__}); the request was not completed", "server_error"),
            status_code=500,
        )

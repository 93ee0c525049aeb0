"""One error shape for every route: OpenAI's `{"error": {"message", "type", "param", "code"}}`.

SGLang's streaming errors use the same object (`data: {"error": {...}}`), and the openai SDK reads
`body["error"]["message"]`, so native and OpenAI routes share it.

    >>> error_body(400, "sampling_params.top_p must be in (0, 1]")["error"]["type"]
    'BadRequestError'
"""

from __future__ import annotations

import logging
from typing import Any, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from sgl.runtime.protocol import RequestError

logger = logging.getLogger("sgl.server")

_TYPES = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError",
          405: "MethodNotAllowed", 413: "RequestTooLarge", 422: "BadRequestError",
          500: "InternalServerError", 503: "ServiceUnavailable"}


class BodyTooLarge(Exception):
    """The request body passed `--max-request-bytes` while it was being read."""


def error_body(status: int, message: str, param: Optional[str] = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": _TYPES.get(status, "Error"), "param": param, "code": status}}


def error_response(status: int, message: str, param: Optional[str] = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param), status_code=status)


def _validation_message(exc: RequestValidationError) -> tuple[str, Optional[str]]:
    """FastAPI's error list -> one line naming the field ('max_tokens: Input should be ...')."""
    parts, first_field = [], None
    for err in exc.errors()[:5]:
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        field = ".".join(loc)
        if err.get("type") == "json_invalid":
            return f"malformed JSON body: {err.get('msg', '')}".strip(), None
        first_field = first_field or field or None
        parts.append(f"{field}: {err.get('msg', 'invalid')}" if field else str(err.get("msg", "invalid")))
    return "; ".join(parts) or "invalid request", first_field


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestError)
    async def _request_error(_: Request, exc: RequestError) -> JSONResponse:
        return error_response(400, str(exc))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, field = _validation_message(exc)
        return error_response(400, message, field)

    @app.exception_handler(BodyTooLarge)
    async def _too_large(_: Request, exc: BodyTooLarge) -> JSONResponse:
        return error_response(400, str(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def _internal(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("internal error: %s", exc)
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}")

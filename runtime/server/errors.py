"""One error shape for every route: OpenAI's `{"error": {"message", "type", "param", "code"}}`.

SGLang's streaming errors use the same object (`data: {"error": {...}}`), and the openai SDK reads
`body["error"]["message"]`, so native and OpenAI routes share it.

    >>> error_body(400, "sampling_params.top_p must be in (0, 1]")["error"]["type"]
    'BadRequestError'
"""

from __future__ import annotations

import logging
import re
from typing import Any, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from sgl.runtime.protocol import InternalError, RequestError

logger = logging.getLogger("sgl.server")

_TYPES = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError",
          405: "MethodNotAllowed", 413: "RequestTooLarge", 422: "BadRequestError",
          500: "InternalServerError", 503: "ServiceUnavailable"}


# Top-level request fields of the native and OpenAI routes: a 400 message that starts with one of these
# (e.g. "sampling_params.top_p must be in (0, 1]") names it, and `param` carries the dotted path.
REQUEST_FIELDS = frozenset({
    "text", "input_ids", "sampling_params", "rid", "n", "stream", "return_logprob", "logprob_start_len",
    "top_logprobs_num", "return_text_in_logprobs", "priority", "lora_path", "image_data", "abort_all",
    "messages", "prompt", "model", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k",
    "min_p", "stop", "seed", "logprobs", "top_logprobs", "response_format", "json_schema", "regex", "ebnf",
    "best_of", "suffix", "tools", "tool_choice", "stream_options", "logit_bias", "frequency_penalty",
    "presence_penalty", "repetition_penalty", "min_tokens", "user", "echo", "kind", "spec",
})
_LEADING_FIELD = re.compile(r"([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*|\[\d+\])*)(?=[\s:=])")


def param_of(message: str) -> Optional[str]:
    """The request field a 400 message starts with ('sampling_params.top_p must ...' ->
    'sampling_params.top_p'), or None when it names none ('the request has ...').

    >>> param_of("sampling_params.stop has 40 strings; the limit is 32"), param_of("malformed JSON body")
    ('sampling_params.stop', None)
    """
    m = _LEADING_FIELD.match(message)
    if m is None or re.split(r"[.\[]", m.group(1), maxsplit=1)[0] not in REQUEST_FIELDS:
        return None
    return m.group(1)


class BodyTooLarge(Exception):
    """The request body passed `--max-request-bytes` while it was being read."""


def error_body(status: int, message: str, param: Optional[str] = None) -> dict[str, Any]:
    """OpenAI's error object; a 400 without an explicit `param` takes the field its message names."""
    if param is None and status == 400:
        param = param_of(message)
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

    @app.exception_handler(InternalError)
    async def _internal_error(_: Request, exc: InternalError) -> JSONResponse:
        return error_response(500, str(exc))

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

"""The OpenAPI document (`GET /openapi.json`): every route's request body, responses and error shape.

The native routes parse their bodies themselves (`protocol.normalize_generate_input` is the
validation), so FastAPI cannot see their types; the pydantic models here describe them for the
spec only, and tests/fuzz/test_openapi_fuzz.py (schemathesis) checks that the server keeps to it:
bodies the spec allows get a 200 or a documented 4xx, and responses match the schemas.

    install_openapi(app)   # after the routers are included
"""

from __future__ import annotations

import warnings
from typing import Any, Literal, Optional, Union

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt

from sgl.runtime.server.openai_protocol import ChatCompletionRequest, CompletionRequest

_MAX_STOP = 32  # protocol.MAX_STOP_STRINGS (the server's --max-stop-strings may be lower)


class SamplingParamsBody(BaseModel):
    """`sampling_params` of `/generate` (SGLang's names); unknown keys are a 400."""

    model_config = ConfigDict(extra="forbid")
    max_new_tokens: Optional[int] = Field(None, ge=0)
    min_new_tokens: Optional[int] = Field(None, ge=0)
    n: Optional[int] = Field(None, ge=1)
    stop: Optional[Union[str, list[str]]] = Field(None, max_length=_MAX_STOP)
    stop_token_ids: Optional[list[int]] = None
    stop_regex: Optional[Union[str, list[str]]] = None
    temperature: Optional[float] = Field(None, ge=0)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    top_k: Optional[int] = Field(None, ge=-1, description="-1 = all; 0 is refused")
    min_p: Optional[float] = Field(None, ge=0, le=1)
    frequency_penalty: Optional[float] = Field(None, ge=-2, le=2)
    presence_penalty: Optional[float] = Field(None, ge=-2, le=2)
    repetition_penalty: Optional[float] = Field(None, gt=0, le=2)
    ignore_eos: Optional[bool] = None
    skip_special_tokens: Optional[bool] = None
    spaces_between_special_tokens: Optional[bool] = None
    no_stop_trim: Optional[bool] = None
    logit_bias: Optional[dict[str, float]] = Field(None, description="token id (decimal string) -> bias")
    sampling_seed: Optional[int] = None
    regex: Optional[str] = None
    json_schema: Optional[str] = Field(None, description="a JSON schema, as a string")
    ebnf: Optional[str] = None
    choices: Optional[list[str]] = Field(None, min_length=1)
    prediction: Optional[Union[str, list[NonNegativeInt]]] = Field(
        None, description="the expected output, text or token ids: drafts for speculative decoding")


class GenerateBody(BaseModel):
    """`POST /generate`: exactly one of `text` / `input_ids` (one prompt, or a list for a batch)."""

    model_config = ConfigDict(extra="allow", json_schema_extra={
        "oneOf": [{"required": ["text"]}, {"required": ["input_ids"]}]})
    text: Optional[Union[str, list[str]]] = None
    input_ids: Optional[Union[list[int], list[list[int]]]] = None
    sampling_params: Optional[Union[SamplingParamsBody, list[SamplingParamsBody]]] = None
    return_logprob: Optional[bool] = None
    logprob_start_len: Optional[int] = Field(None, ge=-1)
    top_logprobs_num: Optional[int] = Field(None, ge=0, le=20)
    return_text_in_logprobs: Optional[bool] = None
    stream: Optional[bool] = None
    rid: Optional[Union[str, list[str]]] = None
    priority: Optional[int] = None
    priority_class: Optional[Literal["realtime", "standard", "batch"]] = None
    lora_path: Optional[Union[str, list[Optional[str]]]] = None


class AbortBody(BaseModel):
    """`POST /abort_request`: a request id (its `n` > 1 siblings `rid-j` too), or every request."""

    model_config = ConfigDict(extra="allow")
    rid: Optional[str] = None
    abort_all: Optional[bool] = None


class LoadLoraBody(BaseModel):
    """`POST /load_lora_adapter`: register the PEFT folder `lora_path` under `lora_name` (SGLang's body)."""

    lora_name: str
    lora_path: str
    base: Optional[str] = None  # several base models: the one it belongs to (else every base it fits)


class UnloadLoraBody(BaseModel):
    """`POST /unload_lora_adapter`: forget `lora_name` (its running requests finish with it)."""

    lora_name: str
    base: Optional[str] = None  # several base models: only this one's (else every base's)


class LoraOutput(BaseModel):
    success: bool
    error_message: str
    loaded_adapters: dict[str, str]  # name -> folder ("base:name" with several base models)


class GenerateOutput(BaseModel):
    text: str
    output_ids: list[int]
    meta_info: dict[str, Any]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: int


class ErrorBody(BaseModel):
    """Every 4xx / 5xx of every route (OpenAI's shape; the message names the field)."""

    error: ErrorDetail


class AbortOutput(BaseModel):
    aborted: list[str]


class IntegrityOutput(BaseModel):
    ok: Literal[True]
    stats: dict[str, Any]


class OpenAIResponse(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: str
    object: str
    created: int
    model: str
    choices: list[dict[str, Any]]


_JSON, _SSE, _TEXT = "application/json", "text/event-stream", "text/plain"
# One server-sent event (what schemathesis validates per event): `data:` is a JSON chunk or [DONE]
_EVENT: dict[str, Any] = {"type": "object", "required": ["data"], "properties": {"data": {"type": "string"}}}
_OBJECT: dict[str, Any] = {"type": "object"}
_HEALTH: dict[str, Any] = {"type": "object", "required": ["healthy", "checks"],
                           "properties": {"healthy": {"type": "boolean"}, "checks": {"type": "object"}}}

# path -> (request body model, {status: (description, {content type: schema})}); errors added below
_ROUTES: dict[str, tuple[Optional[type[BaseModel]], dict[str, tuple[str, dict[str, Any]]]]] = {
    "/generate": (GenerateBody, {"200": ("the output (a list for a batch), or an SSE stream with `stream`", {
        _JSON: {"anyOf": [GenerateOutput, {"type": "array", "items": GenerateOutput}]}, _SSE: _EVENT})}),
    "/abort_request": (AbortBody, {"200": ("the ids aborted", {_JSON: AbortOutput})}),
    "/load_lora_adapter": (LoadLoraBody, {"200": ("loaded; every loaded adapter", {_JSON: LoraOutput})}),
    "/unload_lora_adapter": (UnloadLoraBody, {"200": ("unloaded; the adapters left", {_JSON: LoraOutput})}),
    "/health": (None, {"200": ("serving", {})}),
    "/health_generate": (None, {"200": ("healthy: every check passed (runtime/server/health.py)", {_JSON: _HEALTH}),
                                "503": ("unhealthy: the checks, the failing ones with ok false", {_JSON: _HEALTH})}),
    "/health/ready": (None, {"200": ("ready: every check passed", {_JSON: _HEALTH}),
                             "503": ("not ready: the checks, the failing ones with ok false", {_JSON: _HEALTH})}),
    "/v1/usage": (None, {"200": ("today's tokens and cost per key", {_JSON: _OBJECT}),
                         "403": ("not an admin key", {_JSON: ErrorBody}),
                         "404": ("no such key or key name", {_JSON: ErrorBody})}),
    "/flush_cache": (None, {"200": ("flushed", {_TEXT: {"type": "string"}})}),
    "/metrics": (None, {"200": ("Prometheus text", {_TEXT: {"type": "string"}}),
                        "404": ("metrics are disabled", {_JSON: ErrorBody})}),
    "/check_integrity": (None, {"200": ("the KV pool and radix tree are consistent", {_JSON: IntegrityOutput}),
                                "500": ("a leak, named", {_JSON: ErrorBody})}),
    "/v1/completions": (CompletionRequest, {"200": ("a completion, or an SSE stream", {
        _JSON: OpenAIResponse, _SSE: _EVENT})}),
    "/v1/chat/completions": (ChatCompletionRequest, {"200": ("a chat completion, or an SSE stream", {
        _JSON: OpenAIResponse, _SSE: _EVENT})}),
}
for _p in ("/generate", "/v1/completions", "/v1/chat/completions"):  # runtime/server/tenancy_routes.py
    _ROUTES[_p][1]["429"] = ("over the key's daily token budget or request rate (Retry-After)", {_JSON: ErrorBody})
    _ROUTES[_p][1]["503"] = ("the queue is at --max-queue-depth (Retry-After)", {_JSON: ErrorBody})
    _ROUTES[_p][1]["500"] = ("the engine failed this request by its own fault (crash safety: the error is named; "
                             "other requests go on)", {_JSON: ErrorBody})
for _p in ("/model_info", "/get_model_info", "/server_info", "/get_server_info", "/version", "/get_version",
           "/v1/models"):
    _ROUTES[_p] = (None, {"200": ("an object", {_JSON: _OBJECT})})


def _schema(x: Any, defs: dict[str, Any]) -> dict[str, Any]:
    """A model class (or a schema that nests model classes) -> JSON schema with `$ref`s into `defs`."""
    if isinstance(x, type) and issubclass(x, BaseModel):
        js = x.model_json_schema(ref_template="#/components/schemas/{model}")
        defs.update(js.pop("$defs", {}))
        defs[x.__name__] = js
        return {"$ref": f"#/components/schemas/{x.__name__}"}
    if isinstance(x, dict):
        return {k: _schema(v, defs) for k, v in x.items()}
    if isinstance(x, list):
        return [_schema(v, defs) for v in x]
    return x


def build_openapi(app: FastAPI) -> dict[str, Any]:
    with warnings.catch_warnings():  # NOTE: FastAPI warns on GET+POST routes' shared id; we rename them
        warnings.simplefilter("ignore", UserWarning)
        spec = get_openapi(title=app.title, version=app.version, routes=app.routes)
    defs: dict[str, Any] = spec.setdefault("components", {}).setdefault("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        defs.pop(name, None)
    error = {"content": {_JSON: {"schema": _schema(ErrorBody, defs)}}}
    for path, ops in spec.get("paths", {}).items():
        body_model, responses = _ROUTES.get(path, (None, {"200": ("OK", {})}))
        for method, op in ops.items():
            op["operationId"] = f"{method}_{path.strip('/').replace('/', '_') or 'root'}"  # unique per method
            if body_model is not None and method == "post":
                op["requestBody"] = {"required": True, "content": {_JSON: {"schema": _schema(body_model, defs)}}}
            out: dict[str, Any] = {}
            for status, (desc, content) in responses.items():
                out[status] = {"description": desc}
                if content:
                    out[status]["content"] = {ct: {"schema": _schema(s, defs)} for ct, s in content.items()}
            out.setdefault("400", {"description": "bad input (the message names the field)", **error})
            out.setdefault("401", {"description": "missing or invalid API key (--api-key)", **error})
            out.setdefault("405", {"description": "method not allowed", **error})
            op["responses"] = out
    return spec


def install_openapi(app: FastAPI) -> None:
    """Serve `build_openapi(app)` (built once, on first request) at /openapi.json."""
    cache: dict[str, Any] = {}

    def openapi() -> dict[str, Any]:
        if "spec" not in cache:
            cache["spec"] = build_openapi(app)
        return cache["spec"]

    app.openapi = openapi  # type: ignore[method-assign]


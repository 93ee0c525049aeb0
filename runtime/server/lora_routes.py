"""LoRA adapters over HTTP (SGLang's routes): `POST /load_lora_adapter {"lora_name", "lora_path"}`,
`POST /unload_lora_adapter {"lora_name"}`, and /v1/models' adapter entries. With several base models, both
routes take an optional `base` (a served model name; without it the adapter goes to the models it fits,
runtime/lora/placement.py) and `loaded_adapters` is keyed "base:adapter".

Both routes answer SGLang's shape, `{"success": true, "error_message": "", "loaded_adapters":
{name: path}}`; a refused load/unload is a 400 in our error shape naming the field. Adapter paths
come only from --lora-paths (trusted: the operator's command line) and /load_lora_adapter, whose
`lora_path` must resolve inside --allowed-path-roots (none by default: loading by path over HTTP is off)
and which, with an --api-keys file, takes an admin key. A generate request only names a loaded adapter.
"""

from __future__ import annotations

import asyncio
from typing import Any, Optional

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from sgl.runtime.protocol import RequestError
from sgl.runtime.security import resolve_allowed_path
from sgl.runtime.server.native import get_state, read_json
from sgl.runtime.server.runner import ServerState
from sgl.runtime.server.tenancy_routes import current_tenant

router = APIRouter()


def _engine_with_lora(state: ServerState) -> Any:
    engine = state.engine
    if not hasattr(engine, "load_lora_adapter"):
        raise RequestError("LoRA adapters cannot be loaded at run time on this server (e.g. behind --dp-size > 1)")
    return engine


def _name(body: Any) -> str:
    if not isinstance(body, dict):
        raise RequestError("request body must be a JSON object with lora_name")
    name = body.get("lora_name")
    if not isinstance(name, str) or not name:
        raise RequestError("lora_name must be a non-empty string")
    return name


def _base(state: ServerState, body: dict[str, Any]) -> Optional[str]:
    """The body's optional `base` (our extension): the served model the adapter belongs to. One model served:
    it must be that model's name."""
    base = body.get("base")
    if base is None:
        return None
    if not isinstance(base, str) or base not in state.served_models:
        raise RequestError(f"base: {base!r} is not a served model (served: {', '.join(state.served_models)})")
    return base if getattr(state.engine, "pool", None) is not None else None


def _reply(adapters: dict[str, Any]) -> JSONResponse:
    return JSONResponse({"success": True, "error_message": "",
                         "loaded_adapters": {name: info["path"] for name, info in adapters.items()}})


@router.post("/load_lora_adapter")
async def load_lora_adapter(request: Request) -> JSONResponse:
    state = get_state(request)
    engine = _engine_with_lora(state)
    tenant = current_tenant.get()
    if getattr(state.server_args, "api_keys", None) and not tenant.admin:
        return JSONResponse({"error": {"message": f"key {tenant.name!r} is not an admin key; /load_lora_adapter "
                                       "needs one (\"admin\": true in --api-keys)", "type": "permission_error",
                                       "param": None, "code": 403}}, status_code=403)
    body = await read_json(request)
    name = _name(body)
    path = body.get("lora_path")
    if not isinstance(path, str) or not path:
        raise RequestError("lora_path must be a non-empty string (a folder in PEFT's layout)")
    try:  # NOTE: a request field that names a file: only inside the operator's roots (runtime/security.py)
        path = str(resolve_allowed_path(path, state.server_args.allowed_path_roots, field="lora_path"))
    except ValueError as e:
        raise RequestError(str(e)) from e
    base = _base(state, body)
    try:  # reads the files: off the event loop
        if base is not None or getattr(engine, "pool", None) is not None:  # several models: on its base(s)
            adapters = await asyncio.to_thread(engine.load_lora_adapter, name, path, base)
        else:
            adapters = await asyncio.to_thread(engine.load_lora_adapter, name, path)
    except ValueError as e:  # AdapterError: missing files, unsupported options, shapes, rank, duplicate name
        raise _named(e, "lora_path") from e
    return _reply(adapters)


@router.post("/unload_lora_adapter")
async def unload_lora_adapter(request: Request) -> JSONResponse:
    state = get_state(request)
    engine = _engine_with_lora(state)
    body = await read_json(request)
    name, base = _name(body), _base(state, body)
    try:
        if base is not None or getattr(engine, "pool", None) is not None:
            adapters = await asyncio.to_thread(engine.unload_lora_adapter, name, base)
        else:
            adapters = await asyncio.to_thread(engine.unload_lora_adapter, name)
    except ValueError as e:
        raise _named(e, "lora_name") from e
    return _reply(adapters)


def _named(e: ValueError, field: str) -> RequestError:
    """A 400 whose message starts with the field it is about."""
    msg = str(e)
    return RequestError(msg if msg.startswith(("lora_path", "lora_name")) else f"{field}: {msg}")


def adapter_model_cards(state: ServerState, created: int) -> list[dict[str, Any]]:
    """/v1/models entries of the loaded adapters (vLLM's shape: `parent` is the base model). Several models:
    one "base:adapter" entry per adapter of each base."""
    engine = state.engine
    if hasattr(engine, "adapters_by_model"):
        return [{"id": f"{base}:{name}", "object": "model", "created": created, "owned_by": "sgl", "parent": base,
                 "root": name} for base, names in engine.adapters_by_model().items() for name in names]
    if not hasattr(engine, "lora_names"):
        return []
    return [{"id": name, "object": "model", "created": created, "owned_by": "sgl", "parent": state.model_name,
             "root": name} for name in engine.lora_names()]

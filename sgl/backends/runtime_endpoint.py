"""`sgl.RuntimeEndpoint`: a running server (ours, `sgl serve`, or a real SGLang server) over HTTP.

    >>> sgl.set_default_backend(sgl.RuntimeEndpoint("http://127.0.0.1:30000"))   # doctest: +SKIP

Speaks only the native API of DESIGN.md: `POST /generate` (single, batched, SSE streaming),
`GET /get_model_info`, `GET /get_server_info`, `POST /flush_cache`. The chat template is the one the
server reports in `/get_model_info` (`chat_template`); a server that reports none gets a template
inferred from its `model_path`, as SGLang's frontend does.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterator, Optional

import httpx

from sgl.backends.base import BackendError
from sgl.backends.native import Body, NativeBackend, Response
from sgl.chat_template import ChatTemplate, template_for_model_path
from sgl.runtime.protocol import RequestError

_BATCH_KEYS = ("text", "input_ids", "sampling_params")


class RuntimeEndpoint(NativeBackend):
    """A DSL backend for a server at `base_url` (e.g. "http://127.0.0.1:30000")."""

    def __init__(self, base_url: str, api_key: Optional[str] = None, *, timeout: Optional[float] = None,
                 max_connections: int = 256) -> None:
        super().__init__()
        self.base_url = base_url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.Client(base_url=self.base_url, headers=headers,
                                    timeout=httpx.Timeout(timeout, connect=10.0),
                                    limits=httpx.Limits(max_connections=max_connections,
                                                        max_keepalive_connections=max_connections))
        self.model_info = self._get("/get_model_info")  # also checks that the server is up
        self._template: Optional[ChatTemplate] = None

    # ---- HTTP ------------------------------------------------------------------------------------
    def _get(self, path: str) -> Any:
        try:
            r = self._client.get(path)
        except httpx.HTTPError as e:
            raise BackendError(f"cannot reach {self.base_url}{path}: {e}") from e
        _check(r)
        return r.json()

    def _post(self, path: str, body: Any) -> Any:
        try:
            r = self._client.post(path, json=body)
        except httpx.HTTPError as e:
            raise BackendError(f"request to {self.base_url}{path} failed: {e}") from e
        _check(r)
        return r.json() if r.content else None

    def _generate(self, bodies: list[Body]) -> list[Response]:
        if len(bodies) == 1:
            return [self._post("/generate", bodies[0])]
        batch = _merge(bodies)
        if batch is not None:  # one batched request: the server schedules the items together
            return list(self._post("/generate", batch))
        with ThreadPoolExecutor(min(len(bodies), 32)) as pool:
            return list(pool.map(lambda b: self._post("/generate", b), bodies))

    def _generate_stream(self, body: Body) -> Iterator[dict[str, Any]]:
        try:
            with self._client.stream("POST", "/generate", json=body) as r:
                if r.status_code >= 400:
                    r.read()
                    _check(r)
                for line in r.iter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        return
                    chunk = json.loads(data)
                    if "error" in chunk:
                        raise _error(400 if _is_client_error(chunk) else 500, chunk)
                    yield chunk
        except httpx.HTTPError as e:
            raise BackendError(f"stream from {self.base_url}/generate failed: {e}") from e

    # ---- the Backend interface ---------------------------------------------------------------------
    def get_chat_template(self) -> ChatTemplate:
        if self._template is None:
            template = self.model_info.get("chat_template")
            if template:
                special = {k: self.model_info[k] for k in ("bos_token", "eos_token") if self.model_info.get(k)}
                self._template = ChatTemplate.from_jinja(template, special, name=f"{self.base_url} (server)")
            else:
                self._template = template_for_model_path(str(self.model_info.get("model_path", "")))
        return self._template

    def flush_cache(self) -> bool:
        try:
            r = self._client.post("/flush_cache")
        except httpx.HTTPError as e:
            raise BackendError(f"flush_cache failed: {e}") from e
        return r.status_code == 200

    def get_server_info(self) -> dict[str, Any]:
        return self._get("/get_server_info")

    def shutdown(self) -> None:
        self._client.close()


def _merge(bodies: list[Body]) -> Optional[Body]:
    """Bodies that differ only in text/input_ids/sampling_params -> one batched body, else None."""
    first = bodies[0]
    key = "text" if "text" in first else "input_ids"
    rest = {k: v for k, v in first.items() if k not in _BATCH_KEYS}
    for b in bodies:
        if key not in b or {k: v for k, v in b.items() if k not in _BATCH_KEYS} != rest:
            return None
        if (b.get("sampling_params") or {}).get("n", 1) != 1:
            return None
    sps = [b.get("sampling_params") or {} for b in bodies]
    return {key: [b[key] for b in bodies], **rest,
            "sampling_params": sps[0] if all(sp == sps[0] for sp in sps) else sps}


def _is_client_error(payload: Any) -> bool:
    err = payload.get("error") if isinstance(payload, dict) else None
    code = err.get("code") if isinstance(err, dict) else None
    return isinstance(code, int) and 400 <= code < 500


def _error(status: int, payload: Any) -> Exception:
    msg: Any = payload
    if isinstance(payload, dict):
        err = payload.get("error", payload)
        msg = err.get("message", err) if isinstance(err, dict) else err
    # NOTE: a 400 is the same RequestError the in-process engine raises, so programs see one type.
    return RequestError(str(msg)) if 400 <= status < 500 else BackendError(f"server error {status}: {msg}")


def _check(r: httpx.Response) -> None:
    if r.status_code < 400:
        return
    try:
        payload: Any = r.json()
    except ValueError:
        payload = r.text
    raise _error(r.status_code, payload)

"""Every end-to-end test ends with the KV integrity check of the engine or server it used:
free + cached + in-use slots == pool size, and nothing left locked once idle."""

from __future__ import annotations

from typing import Any, Iterator

import httpx
import pytest

ENGINE_FIXTURES = ("engine", "rt")  # an Engine, or an sgl.Runtime wrapping one
SERVER_FIXTURES = ("server",)  # a ServerHandle (tests/e2e/server_helpers.py)


def _check_engine(obj: Any) -> None:
    engine = getattr(obj, "engine", obj)
    engine.wait_idle(timeout=60)
    engine.check_integrity()


def _check_server(handle: Any) -> None:
    if handle.proc.poll() is not None:
        return  # the test stopped the server on purpose (graceful shutdown tests)
    handle.wait_idle(timeout=60)
    r = httpx.get(handle.url + "/check_integrity", headers=handle.headers, timeout=60)
    assert r.status_code == 200 and r.json()["ok"] is True, f"KV integrity check failed: {r.text}"


@pytest.fixture(autouse=True)
def kv_integrity_after_each_test(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    for name in request.fixturenames:
        if name in ENGINE_FIXTURES:
            _check_engine(request.getfixturevalue(name))
        elif name in SERVER_FIXTURES:
            _check_server(request.getfixturevalue(name))

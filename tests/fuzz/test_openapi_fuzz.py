"""Schemathesis against our own /openapi.json: every route of the native and OpenAI APIs, positive and
negative bodies, on the real server. Properties: no 5xx, every status and body as documented (4xx in
the error shape, its message naming the field when a field is at fault), /health answers after each
case, and the KV integrity check holds when idle afterwards (conftest). Bounded for CI by
FUZZ_EXAMPLES (per operation and mode); `make fuzz` runs more."""

from __future__ import annotations

import os
from typing import Any, Iterator

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (content_type_conformance, negative_data_rejection,
                                                response_schema_conformance, status_code_conformance)

from tests.e2e.server_helpers import ServerHandle

pytestmark = pytest.mark.timeout(900)

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "6"))
MAX_TOKENS = 4  # generated bodies ask for at most this many new tokens (the run stays short)
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          negative_data_rejection]
# The spec's routes (a new route added without a spec entry is caught by test_every_route_is_fuzzed).
ROUTES = ["/generate", "/abort_request", "/health", "/health_generate", "/model_info", "/get_model_info",
          "/server_info", "/get_server_info", "/version", "/get_version", "/flush_cache", "/metrics",
          "/check_integrity", "/v1/models", "/v1/completions", "/v1/chat/completions"]
BODY_ROUTES = {"/generate", "/abort_request", "/v1/completions", "/v1/chat/completions"}
COUNTS: dict[str, int] = {}


@pytest.fixture(scope="module")
def api(server: ServerHandle) -> Any:
    return schemathesis.openapi.from_url(server.url + "/openapi.json")


def _clamp(body: Any) -> None:
    """Keep generation short: integer max_new_tokens / max_tokens / n in a generated body are capped."""
    if not isinstance(body, dict):
        return
    for key, cap in (("max_tokens", MAX_TOKENS), ("max_completion_tokens", MAX_TOKENS), ("n", 2)):
        if isinstance(body.get(key), int) and not isinstance(body.get(key), bool) and body[key] > cap:
            body[key] = cap
    if "max_tokens" not in body and "messages" in body:
        body["max_tokens"] = MAX_TOKENS
    sps = body.get("sampling_params")
    for sp in sps if isinstance(sps, list) else [sps]:
        if isinstance(sp, dict):
            for key, cap in (("max_new_tokens", MAX_TOKENS), ("n", 2), ("min_new_tokens", MAX_TOKENS)):
                v = sp.get(key)
                if isinstance(v, int) and not isinstance(v, bool) and v > cap:
                    sp[key] = cap
            sp.setdefault("max_new_tokens", MAX_TOKENS)
    if "text" in body or "input_ids" in body:
        body.setdefault("sampling_params", {"max_new_tokens": MAX_TOKENS})


def _check_error_shape(response: Any) -> None:
    if response.status_code < 400:
        return
    err = response.json()["error"]
    assert isinstance(err["message"], str) and err["message"], err
    assert err["code"] == response.status_code, err


def _run_operation(api: Any, server: ServerHandle, method: str, path: str, mode: GenerationMode) -> int:
    op = api[path][method.upper()]
    seen = [0]

    # NOTE: no shrinking phase: each case is an HTTP round trip, and the failing body is reported as is
    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True, report_multiple_bugs=False,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    @given(case=op.as_strategy(generation_mode=mode))
    def run(case: Any) -> None:
        _clamp(case.body)
        response = case.call(base_url=server.url, timeout=120)
        case.validate_response(response, checks=CHECKS)
        _check_error_shape(response)
        assert httpx.get(server.url + "/health", timeout=30).status_code == 200, "server stopped answering"
        seen[0] += 1

    run()
    return seen[0]


def _operations(api: Any) -> Iterator[tuple[str, str]]:
    for result in api.get_all_operations():
        op = result.ok()
        yield op.method.upper(), op.path


def test_every_route_is_fuzzed(api: Any) -> None:
    paths = {p for _, p in _operations(api)}
    assert set(ROUTES) <= paths, set(ROUTES) - paths


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=str)
@pytest.mark.parametrize("path", ROUTES)
def test_route(api: Any, server: ServerHandle, path: str, mode: GenerationMode) -> None:
    ops = [(m, p) for m, p in _operations(api) if p == path]
    assert ops, f"{path} is not in /openapi.json"
    for method, p in ops:
        if mode == GenerationMode.NEGATIVE and p not in BODY_ROUTES:
            continue  # no parameters and no body: nothing to get wrong
        COUNTS[f"{method} {p} {mode}"] = _run_operation(api, server, method, p, mode)


def test_generate_then_abort_by_rid(server: ServerHandle) -> None:
    """Stateful: a stream is started with a rid, aborted by that rid, and ends with an abort reason."""
    from tests.e2e.server_helpers import sse_events
    body = {"text": "Tell me a long story.", "rid": "fuzz-abort-1", "stream": True,
            "sampling_params": {"max_new_tokens": 200, "ignore_eos": True}}
    with httpx.stream("POST", server.url + "/generate", json=body, timeout=120) as r:
        events = sse_events(r.iter_lines())
        first = next(events)
        assert "error" not in first
        a = httpx.post(server.url + "/abort_request", json={"rid": "fuzz-abort-1"}, timeout=30)
        assert a.status_code == 200 and "fuzz-abort-1" in a.json()["aborted"]
        last = first
        for ev in events:
            if ev == "[DONE]":
                break
            last = ev
    assert last["meta_info"]["finish_reason"]["type"] == "abort", last
    assert last["meta_info"]["completion_tokens"] < 200


def test_report_counts() -> None:
    total = sum(COUNTS.values())
    print(f"\nschemathesis cases run: {total} over {len(COUNTS)} operation x mode pairs")

"""The web console's HTTP side without a model: routes on/off, the key guard, /v1/stats, /v1/validate,
and the recent-latency percentiles. (The page itself runs in a real browser in tests/browser.)"""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

from sgl.runtime.config import ServerArgs
from sgl.runtime.metrics import RecentLatencies
from sgl.runtime.server.app import create_app
from sgl.runtime.server.web_console import validate_output


class StubTokenizer:
    vocab_size = 100
    chat_template = None

    def encode(self, text: str) -> list[int]:
        return [1] * len(text.split())


class StubEngine:
    """Only the read-only contract the console routes use (no generation)."""

    def __init__(self, args: ServerArgs) -> None:
        self.server_args, self.tokenizer = args, StubTokenizer()

    def get_model_info(self) -> dict[str, Any]:
        return {"context_length": 2048, "vocab_size": 100}

    def get_server_info(self) -> dict[str, Any]:
        return {}

    def get_stats(self) -> dict[str, Any]:
        return {"num_running_reqs": 1, "num_queue_reqs": 2, "token_usage": 0.25, "cache_hit_rate": 0.5,
                "prompt_tokens_total": 40, "generation_tokens_total": 10, "max_total_tokens": 1000}

    def get_cache_stats(self) -> dict[str, int]:
        return {"kv_total_tokens": 1000, "kv_free_tokens": 750, "kv_cached_tokens": 50, "kv_in_use_tokens": 200,
                "radix_num_nodes": 3, "radix_num_tokens": 120}


def client(**kwargs: Any) -> TestClient:
    args = ServerArgs(model_path="stub", **kwargs)
    return TestClient(create_app(StubEngine(args), args))


def test_page_served_and_open_without_key() -> None:
    c = client(api_key="k")
    r = c.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html") and "app.js" in r.text
    assert c.get("/console/app.js").headers["content-type"].startswith("text/javascript")
    assert c.get("/console/style.css").status_code == 200
    assert c.get("/console/../config.py").status_code in (401, 404)  # only the fixed files are served
    assert c.get("/v1/stats").status_code == 401
    stats = c.get("/v1/stats", headers={"Authorization": "Bearer k"}).json()
    assert stats["kv"] == {"total": 1000, "in_use": 200, "cached": 50, "free": 750, "token_usage": 0.25}
    assert (stats["num_running_reqs"], stats["num_queue_reqs"], stats["radix"]["num_nodes"]) == (1, 2, 3)
    # NOTE: from this engine's own counters, never the process-wide histogram other engines filled
    assert stats["queues"] == {"default": 2} and stats["speculative"]["mean_accept_length"] is None


def test_stats_speculative_accept_length_is_the_engines_own() -> None:
    c = client()
    c.app.state.sgl.engine.get_stats = lambda: {"num_running_reqs": 1, "num_queue_reqs": 0, "spec_verify_ct": 4,
                                                "spec_accept_length": 2.5, "max_total_tokens": 1000}
    assert c.get("/v1/stats").json()["speculative"]["mean_accept_length"] == 2.5


def test_disable_web_console() -> None:
    c = client(disable_web_console=True)
    assert c.get("/").status_code == 404
    assert c.get("/console/app.js").status_code == 404
    assert c.get("/v1/stats").status_code == 200  # the JSON feed stays for scripts
    assert c.get("/metrics").status_code == 404  # console off and --enable-metrics off: no /metrics


def test_console_on_keeps_metrics_off_unless_asked() -> None:
    assert client().get("/metrics").status_code == 404
    assert client(enable_metrics=True).get("/metrics").status_code == 200


@pytest.mark.parametrize("kind,spec,text,valid", [
    ("regex", r"\([0-9]{3}\) [0-9]{3}-[0-9]{4}", "(555) 123-4567", True),
    ("regex", r"[0-9]+", "12a", False),
    ("choices", "blue\ngreen", "green", True),
    ("choices", "blue\ngreen", "red", False),
    ("json_schema", '{"type": "object", "required": ["a"]}', '{"a": 1}', True),
    ("json_schema", '{"type": "object", "required": ["a"]}', '{"b": 1}', False),
    ("json_schema", '{"type": "object"}', '{"a": ', False),
    ("ebnf", 'start: NUM ("+" NUM)*\nNUM: /[0-9]+/', "1+22", True),
    ("ebnf", 'start: NUM ("+" NUM)*\nNUM: /[0-9]+/', "1+", False),
])
def test_validate_output(kind: str, spec: str, text: str, valid: bool) -> None:
    got = validate_output(kind, spec, text)
    assert got["valid"] is valid and (got["error"] is None) is valid


def test_validate_route_names_bad_fields() -> None:
    c = client()
    assert c.post("/v1/validate", json={"kind": "regex", "spec": "a+", "text": "aa"}).json()["valid"] is True
    for body, field in [({"kind": "xml", "spec": "", "text": ""}, "kind"), ({"kind": "regex", "spec": "(", "text": ""},
                        "spec"), ({"kind": "regex", "spec": "a", "text": 3}, "text")]:
        r = c.post("/v1/validate", json=body)
        assert r.status_code == 400 and field in r.text, r.text


def test_recent_latency_percentiles() -> None:
    w = RecentLatencies(window_s=60)
    assert w.percentiles()["ttft"] == {}
    for ms in range(1, 101):
        w.add(w.ttft, ms / 1000)
    w.add(w.itl, 0.02, count=4)
    p = w.percentiles()
    assert p["ttft"] == {"p50": 0.051, "p90": 0.091, "p99": 0.1} and p["ttft_samples"] == 100
    assert p["itl"]["p50"] == 0.02 and p["itl_samples"] == 4
    w.window_s = 0.0  # everything older than now drops out
    assert w.percentiles()["ttft"] == {}


def test_validate_bounds_its_input() -> None:
    r = client().post("/v1/validate", json={"kind": "regex", "spec": "a*", "text": "a" * 40_000})
    assert r.status_code == 400 and "text" in r.text and "limit" in r.text


def test_validators_are_imported_on_first_use() -> None:
    # lark and jsonschema only serve /v1/validate: importing them with the app kept 4.6 MB resident in
    # every server (benchmarks/bench_memory.py); the first validation imports them
    import subprocess
    import sys

    code = ("import sys; import sgl.runtime.server.app; print(sorted(m for m in ('lark', 'jsonschema') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out
    assert validate_output("ebnf", 'start: "a"+', "aaa")["valid"]
    assert not validate_output("json_schema", '{"type": "integer"}', '"x"')["valid"]

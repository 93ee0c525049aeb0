"""Load: 200 concurrent streaming requests of mixed lengths from one process (loopback only), 20 of
them disconnecting midway. Every completed response is well-formed, none is lost, the aborted ones
free their KV, and the KV pool integrity check passes after the drain. Then the serving benchmark
runs briefly against the same server, and SIGTERM with a request in flight ends it cleanly.

The server here is started through the `sgl serve` console entry."""

from __future__ import annotations

import asyncio
import json
import pathlib
import subprocess
import sys
import time
from typing import Any, Iterator, Optional

import httpx
import pytest

from tests.e2e.server_helpers import ServerHandle, running_server, sse_events

pytestmark = pytest.mark.timeout(400)

NUM_REQUESTS = 200
DISCONNECT_EVERY = 10  # requests 0, 10, 20, ... hang up after their first chunks (20 of them)
DEADLINE_S = 240.0
ROOT = pathlib.Path(__file__).resolve().parents[2]
SGL = str(pathlib.Path(sys.executable).parent / "sgl")


@pytest.fixture(scope="module")
def server() -> Iterator[ServerHandle]:
    with running_server(command=[SGL, "serve"]) as handle:
        yield handle
    assert handle.proc.returncode == 0, handle.log()[-3000:]


def plan(i: int) -> tuple[str, int, bool]:
    """(prompt, max_new_tokens, disconnects) for request i: prompts of 3..40 words, 1..8 new tokens."""
    prompt = f"Request {i}: " + " ".join(["apple", "river", "stone", "cloud"][j % 4] for j in range(i % 37))
    disconnects = i % DISCONNECT_EVERY == 0
    return prompt, (200 if disconnects else 1 + i % 8), disconnects


async def one(client: httpx.AsyncClient, i: int) -> dict[str, Any]:
    prompt, max_new, disconnects = plan(i)
    body = {"text": prompt, "rid": f"load-{i}", "stream": True,
            "sampling_params": {"max_new_tokens": max_new, "ignore_eos": True, "temperature": 0.7}}
    events: list[Any] = []
    async with client.stream("POST", "/generate", json=body) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if not line:
                continue
            assert line.startswith("data: "), line
            payload = line[len("data: "):]
            events.append(payload if payload == "[DONE]" else json.loads(payload))
            if disconnects and len(events) >= 2:
                break  # leaving the context manager closes the connection mid-stream
    return {"i": i, "events": events, "max_new": max_new, "disconnected": disconnects}


async def run_all(url: str) -> tuple[list[Any], float]:
    limits = httpx.Limits(max_connections=NUM_REQUESTS + 10, max_keepalive_connections=NUM_REQUESTS + 10)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=httpx.Timeout(DEADLINE_S)) as client:
        t0 = time.monotonic()
        results = await asyncio.wait_for(
            asyncio.gather(*[one(client, i) for i in range(NUM_REQUESTS)], return_exceptions=True), DEADLINE_S)
        return list(results), time.monotonic() - t0


def check_completed(res: dict[str, Any]) -> None:
    events, max_new = res["events"], res["max_new"]
    assert events[-1] == "[DONE]", f"request {res['i']} did not end with [DONE]"
    chunks = events[:-1]
    assert chunks, f"request {res['i']} got no chunk"
    for a, b in zip(chunks, chunks[1:]):
        assert b["text"].startswith(a["text"]) and a["meta_info"]["finish_reason"] is None
    final = chunks[-1]
    meta = final["meta_info"]
    assert meta["id"] == f"load-{res['i']}"
    assert meta["finish_reason"] == {"type": "length", "length": max_new}, meta
    assert meta["completion_tokens"] == len(final["output_ids"]) == max_new


def metric(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_200_concurrent_streams_with_disconnects(server: ServerHandle) -> None:
    before: Optional[str] = httpx.get(server.url + "/metrics").text
    results, elapsed = asyncio.run(run_all(server.url))
    errors = [r for r in results if isinstance(r, BaseException)]
    assert not errors, f"{len(errors)} requests failed, first: {errors[0]!r}"
    completed = [r for r in results if not r["disconnected"]]
    gone = [r for r in results if r["disconnected"]]
    assert len(completed) == NUM_REQUESTS - NUM_REQUESTS // DISCONNECT_EVERY and len(gone) == 20
    for res in completed:
        check_completed(res)
    for res in gone:
        assert len(res["events"]) == 2 and res["events"][-1] != "[DONE]"

    # Drain: the disconnected requests are aborted (not decoded to 200 tokens), then the pool is whole.
    stats = server.wait_idle(timeout=30)
    r = httpx.get(server.url + "/check_integrity")
    assert r.status_code == 200 and r.json()["ok"] is True, r.text
    after = httpx.get(server.url + "/metrics").text
    aborted = metric(after, "sgl:num_aborted_requests_total") - metric(before, "sgl:num_aborted_requests_total")
    assert aborted >= 20, aborted
    finished = metric(after, "sgl:num_requests_total") - metric(before, "sgl:num_requests_total")
    assert finished >= NUM_REQUESTS
    generated = stats["generation_tokens_total"]
    assert generated < sum(r["max_new"] for r in completed) + 20 * 100, "disconnected requests kept decoding"
    print(f"200 streams in {elapsed:.1f}s; stats after drain: {stats}")

    ok = httpx.post(server.url + "/generate", json={"text": "Still alive?", "sampling_params": {"max_new_tokens": 2}})
    assert ok.status_code == 200 and ok.json()["meta_info"]["completion_tokens"] >= 1


def test_bench_serving_smoke(server: ServerHandle, tmp_path: pathlib.Path) -> None:
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_serving.py"), "--base-url", server.url,
           "--num-prompts", "6", "--input-len", "8", "--output-len", "4", "--request-rates", "4,inf",
           "--output-dir", str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    record = json.loads((tmp_path / "bench_serving_random.json").read_text())
    assert [r["request_rate"] for r in record["results"]] == [4.0, "inf"]
    for r in record["results"]:
        # ignore_eos: every request decodes its full length, 2..4 tokens (range ratio 0.5 of 4)
        assert r["completed"] == 6 and r["failed"] == 0 and 12 <= r["output_tokens"] <= 24
        assert 0 < r["p50_ttft_ms"] <= r["p99_ttft_ms"] and r["p50_itl_ms"] > 0 and r["output_throughput"] > 0
    assert (tmp_path / "bench_serving_random.png").stat().st_size > 10_000


def test_sigterm_finishes_inflight_request_and_exits_0(server: ServerHandle) -> None:
    """Runs last in this module: it stops the server."""
    body = {"text": "Count slowly:", "stream": True, "rid": "inflight",
            "sampling_params": {"max_new_tokens": 24, "ignore_eos": True}}
    with httpx.stream("POST", server.url + "/generate", json=body, timeout=120) as r:
        events = sse_events(r.iter_lines())
        first = next(events)
        assert first["meta_info"]["finish_reason"] is None
        server.proc.send_signal(15)  # SIGTERM with the request in flight
        rest = list(events)
    assert rest[-1] == "[DONE]"
    assert rest[-2]["meta_info"]["finish_reason"] == {"type": "length", "length": 24}, "in-flight request finished"
    assert server.proc.wait(timeout=60) == 0
    log = server.log()
    assert "rid=inflight" in log and "server stopped" in log
    with pytest.raises(httpx.ConnectError):
        httpx.get(server.url + "/health", timeout=2)

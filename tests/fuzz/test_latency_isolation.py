"""Expensive but legal requests (each kind just under the tier's caps) do not slow a running stream:
for each kind, the median inter-token latency of a greedy stream while that kind keeps arriving stays
within 2x of the same stream alone, measured in the same test.

Kinds: a large grammar near --grammar-max-size (distinct each time, so it compiles), the most and
longest stop strings allowed, the largest logit_bias allowed, and a prompt near --max-prompt-tokens
(distinct each time, so it is prefilled). Each kind is sent by one client, one request at a time with
a 0.2 s pause. (A flood of back-to-back distinct long prompts puts a ~250-token prefill into most steps
of the stream, which costs ~2x a decode step on one CPU thread: that is the chunked-prefill trade-off,
bounded by --chunked-prefill-size, not a stall.)
On this shared machine a ratio over 2 is measured once more before the test fails (medians of both).
"""

from __future__ import annotations

import itertools
import json
import statistics
import threading
import time
from typing import Any, Callable

import httpx
import pytest

from tests.e2e.server_helpers import ServerHandle, sse_events
from tests.fuzz.conftest import LIMITS

pytestmark = pytest.mark.timeout(400)

STREAM_TOKENS = 24
PAUSE_S = 0.2  # between one client's requests: steady arrivals, not a saturating flood
MAX_RATIO = 2.0
_ids = itertools.count()


def big_grammar() -> dict[str, Any]:
    i = next(_ids)
    if i % 2:  # a regex of size ~ the cap: (prefix) + [a-z0-9]{1,N}
        n = LIMITS["--grammar-max-size"] - 50
        return {"regex": f"id{i}-[a-z0-9]{{1,{n}}}"}
    per = (LIMITS["--grammar-max-size"] - 100) // 40  # 40 properties of maxLength `per`: ~ the cap
    schema = {"type": "object", "properties": {f"k{i}_{j}": {"type": "string", "maxLength": per} for j in range(40)}}
    return {"json_schema": json.dumps(schema)}


KINDS: dict[str, Callable[[], dict[str, Any]]] = {
    "grammar near the cap": lambda: {"text": "Give me an id:", "sampling_params": {
        "max_new_tokens": 8, "temperature": 0, **big_grammar()}},
    "most stop strings": lambda: {"text": "Tell me a story.", "sampling_params": {
        "max_new_tokens": 8, "temperature": 0,
        "stop": [f"{next(_ids)}{'q' * LIMITS['--max-stop-string-chars']}"[:LIMITS["--max-stop-string-chars"]]
                 for _ in range(LIMITS["--max-stop-strings"])]}},
    "largest logit_bias": lambda: {"text": "Say something.", "sampling_params": {
        "max_new_tokens": 8, "temperature": 0,
        "logit_bias": {str(100 + 7 * j): -5.0 for j in range(LIMITS["--max-logit-bias"])}}},
    "long prompt": lambda: {"text": f"{next(_ids)} " + "the quick brown fox jumps over a lazy dog " * 24,
                            "sampling_params": {"max_new_tokens": 2, "temperature": 0}},
}


def stream_gaps(url: str) -> list[float]:
    body = {"text": "Count from one to one hundred:", "stream": True,
            "sampling_params": {"max_new_tokens": STREAM_TOKENS, "temperature": 0, "ignore_eos": True}}
    gaps: list[float] = []
    last = None
    with httpx.stream("POST", url + "/generate", json=body, timeout=120) as r:
        assert r.status_code == 200, r.read()
        for ev in sse_events(r.iter_lines()):
            if ev == "[DONE]":
                break
            assert "error" not in ev, ev
            now = time.perf_counter()
            if last is not None:
                gaps.append(now - last)
            last = now
    assert len(gaps) == STREAM_TOKENS - 1
    return gaps


def loud_gaps(url: str, make: Callable[[], dict[str, Any]]) -> tuple[list[float], list[int]]:
    """The stream's gaps while one client sends `make()` requests one after another; their statuses."""
    done = threading.Event()
    statuses: list[int] = []

    def fire() -> None:
        with httpx.Client(base_url=url, timeout=120) as c:
            while not done.is_set():
                statuses.append(c.post("/generate", json=make()).status_code)
                done.wait(PAUSE_S)

    t = threading.Thread(target=fire)
    t.start()
    time.sleep(0.3)  # the first expensive request is in flight before the stream starts
    try:
        gaps = stream_gaps(url)
    finally:
        done.set()
        t.join(timeout=120)
    return gaps, statuses


@pytest.fixture(scope="module")
def alone_itl(server: ServerHandle) -> list[float]:
    """The stream's median ITL alone (a list: a retry appends a fresh measurement)."""
    return [statistics.median(stream_gaps(server.url))]


@pytest.mark.parametrize("kind", list(KINDS))
def test_stream_itl_within_2x_while_expensive_requests_arrive(server: ServerHandle, alone_itl: list[float],
                                                              kind: str) -> None:
    make = KINDS[kind]
    assert httpx.post(server.url + "/generate", json=make(), timeout=120).status_code == 200  # legal
    for attempt in range(2):
        if attempt:  # the machine is shared: measure alone again right before the second try
            alone_itl.append(statistics.median(stream_gaps(server.url)))
        alone = alone_itl[-1]
        gaps, statuses = loud_gaps(server.url, make)
        loud = statistics.median(gaps)
        print(f"\n{kind}: stream ITL median alone {alone * 1000:.1f} ms, with {len(statuses)} requests "
              f"{loud * 1000:.1f} ms (x{loud / alone:.2f}, attempt {attempt + 1})")
        assert statuses and set(statuses) == {200}, statuses
        if loud <= MAX_RATIO * alone:
            return
    pytest.fail(f"{kind}: the stream's median inter-token latency went from {alone * 1000:.1f} ms alone to "
                f"{loud * 1000:.1f} ms (x{loud / alone:.2f} > {MAX_RATIO}) while {len(statuses)} such requests "
                "ran, twice in a row")


def test_huge_text_is_refused_without_stalling_the_server(server: ServerHandle) -> None:
    """A 6 MB prompt (under --max-request-bytes) cannot fit --max-prompt-tokens: refused (400 naming the
    field, by its length in characters) before it is tokenized. Before the fix each such request was
    tokenized whole first: ~20 s of a core on this machine per request (3 took 64 s), a cheap way for
    one client to burn the server's CPU; the running stream must not stall either way."""
    huge = "the quick brown fox jumps over a lazy dog " * 150_000  # 6.3 MB
    statuses: list[tuple[int, Any]] = []

    def fire() -> None:
        with httpx.Client(base_url=server.url, timeout=120) as c:
            for route, body in (("/generate", {"text": huge, "sampling_params": {"max_new_tokens": 1}}),
                                ("/v1/chat/completions", {"model": "default",
                                                          "messages": [{"role": "user", "content": huge}]}),
                                ("/v1/completions", {"model": "default", "prompt": huge, "max_tokens": 1})):
                r = c.post(route, json=body)
                err = r.json()["error"]
                statuses.append((r.status_code, err.get("param") if "characters" in err["message"] else None))

    t = threading.Thread(target=fire)
    t0 = time.perf_counter()
    t.start()
    gaps: list[float] = []
    while t.is_alive() or not gaps:  # streams back to back for as long as the refusals take
        gaps += stream_gaps(server.url)
    t.join(timeout=120)
    print(f"\nstream max gap while 3 huge prompts were refused: {max(gaps) * 1000:.0f} ms "
          f"(median {statistics.median(gaps) * 1000:.0f} ms); refusals took {time.perf_counter() - t0:.1f} s")
    assert [s for s, _ in statuses] == [400, 400, 400], statuses
    assert [p for _, p in statuses] == ["text", "messages", "text"], statuses  # refused by length, untokenized
    assert max(gaps) < 3.0, f"the stream stalled {max(gaps):.1f} s while huge prompts were refused"

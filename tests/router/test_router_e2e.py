"""`sgl serve --dp-size 2` and `sgl router` with real replicas of the default model, real clients."""

from __future__ import annotations

import concurrent.futures as cf
import os
import signal
import time

import httpx
import openai
from tests.e2e.server_helpers import sse_events
from tests.router.conftest import DP, RouterProc, start_router, stop_router

SYSTEM = ("You are a meticulous assistant for a travel agency. Answer in one short sentence, mention the "
          "country, never invent prices, and be polite. ")


def gen(url: str, text: str, n: int = 4, **extra: object) -> httpx.Response:
    body = {"text": text, "sampling_params": {"max_new_tokens": n, "temperature": 0}, **extra}
    return httpx.post(url + "/generate", json=body, timeout=120)


def test_greedy_through_router_equals_direct_and_openai_routes(dp: DP) -> None:
    via = gen(dp.handle.url, "The capital of France is", 8)
    assert via.status_code == 200, via.text
    direct = [gen(w, "The capital of France is", 8).json()["text"] for w in dp.workers]
    assert direct == [via.json()["text"]] * 2
    client = openai.OpenAI(base_url=dp.handle.url + "/v1", api_key="x")
    assert client.models.list().data
    chat = client.chat.completions.create(model="default", messages=[{"role": "user", "content": "Hi"}],
                                          max_tokens=4, temperature=0)
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="default", messages=[{"role": "user", "content": "Hi"}], max_tokens=4, temperature=0, stream=True)
        if c.choices)
    assert streamed == chat.choices[0].message.content
    with httpx.stream("POST", dp.handle.url + "/generate", timeout=60, json={
            "text": "The capital of France is", "stream": True,
            "sampling_params": {"max_new_tokens": 8, "temperature": 0}}) as r:
        events = list(sse_events(r.iter_lines()))
    assert events[-1] == "[DONE]" and events[-2]["text"] == via.json()["text"]
    info = httpx.get(dp.handle.url + "/server_info", timeout=30).json()
    assert info["dp_size"] == 2 and len(info["internal_states"]) == 2
    assert httpx.post(dp.handle.url + "/flush_cache", timeout=30).status_code == 200


def test_cache_aware_keeps_a_prefix_on_one_replica(dp: DP) -> None:
    rp = start_router(dp.workers, "--policy", "cache_aware")
    try:
        before = rp.counts()
        metas = [gen(rp.url, SYSTEM + q).json()["meta_info"] for q in ("Paris?", "Rome?", "Oslo?")]
        after = rp.counts()
        delta = {w: after[w] - before[w] for w in after}
        assert sorted(delta.values()) == [0, 3], delta
        assert all(m["cached_tokens"] > 0 for m in metas[1:]), metas
        other = "Write a haiku about autumn leaves falling on a quiet pond."
        gen(rp.url, other)  # no match: the replica with the smaller tree, i.e. the other one
        final = rp.counts()
        assert [final[w] - after[w] for w in final] == [int(delta[w] == 0) for w in final]
        assert 'decision="cache_hit"} 2' in httpx.get(rp.url + "/metrics").text
    finally:
        stop_router(rp)


def test_balance_threshold_spreads_a_load(dp: DP) -> None:
    rp = start_router(dp.workers, "--policy", "cache_aware", "--balance-threshold", "1")
    try:
        before = rp.counts()
        with cf.ThreadPoolExecutor(6) as ex:
            rs = list(ex.map(lambda q: gen(rp.url, SYSTEM + q, 12), [f"City {i}?" for i in range(6)]))
        assert all(r.status_code == 200 for r in rs)
        delta = [rp.counts()[w] - before[w] for w in dp.workers]
        assert min(delta) >= 1 and sum(delta) == 6, delta
        assert rp.info()["decisions"].get("balance", 0) >= 1
    finally:
        stop_router(rp)


def test_round_robin_alternates(dp: DP) -> None:
    rp = start_router(dp.workers, "--policy", "round_robin")
    try:
        seq = []
        for i in range(4):
            before = rp.counts()
            assert gen(rp.url, SYSTEM, 2).status_code == 200
            after = rp.counts()
            seq += [w for w in after if after[w] > before[w]]
        assert seq[0] != seq[1] and seq[0::2] == [seq[0]] * 2 and seq[1::2] == [seq[1]] * 2
    finally:
        stop_router(rp)


def test_bad_input_is_a_400_from_the_worker(dp: DP) -> None:
    r = httpx.post(dp.handle.url + "/generate", content=b"{not json", timeout=30)
    assert r.status_code == 400 and "malformed JSON" in r.json()["error"]["message"]
    r = gen(dp.handle.url, "x", -3)
    assert r.status_code == 400 and "max_new_tokens" in r.json()["error"]["message"]


def busy_worker(rp: RouterProc) -> str:
    deadline = time.monotonic() + 60
    while True:
        busy = [w["url"] for w in rp.info()["workers"] if w["inflight"]]
        if busy:
            return busy[0]
        assert time.monotonic() < deadline, "the request never reached a worker"
        time.sleep(0.05)


def wait_health(rp: RouterProc, url: str, healthy: bool, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while next(w["healthy"] for w in rp.info()["workers"] if w["url"] == url) != healthy:
        assert time.monotonic() < deadline, f"{url} never became healthy={healthy}"
        time.sleep(0.1)


def test_hung_worker_gives_502_and_comes_back(dp: DP) -> None:
    """A worker that stops answering (SIGSTOP) fails its health probes: its in-flight request gets a
    502 instead of hanging, the others go on, and after SIGCONT it rejoins."""
    rp = start_router(dp.workers, "--policy", "round_robin")
    try:
        with cf.ThreadPoolExecutor(1) as ex:
            fut = ex.submit(gen, rp.url, "Count slowly:", 400, ignore_eos=True)
            victim = busy_worker(rp)
            pid = dp.replica_pid(victim)
            os.kill(pid, signal.SIGSTOP)
            try:
                r = fut.result(timeout=30)
                assert r.status_code == 502 and "taken out" in r.json()["error"]["message"], r.text
                wait_health(rp, victim, False)
                assert all(gen(rp.url, q).status_code == 200 for q in ("A?", "B?"))
            finally:
                os.kill(pid, signal.SIGCONT)
        wait_health(rp, victim, True)
        before = rp.counts()
        assert all(gen(rp.url, q).status_code == 200 for q in ("D?", "E?"))
        assert rp.counts()[victim] == before[victim] + 1
    finally:
        stop_router(rp)


def test_killed_worker_gives_502_and_the_others_continue(dp: DP) -> None:
    """Last test of the tier: it kills a replica (SIGKILL) for good."""
    rp = start_router(dp.workers, "--policy", "round_robin")
    try:
        with cf.ThreadPoolExecutor(1) as ex:
            fut = ex.submit(gen, rp.url, "Count slowly:", 400, ignore_eos=True)
            victim = busy_worker(rp)
            time.sleep(0.5)  # let it decode a little
            os.kill(dp.replica_pid(victim), signal.SIGKILL)
            r = fut.result(timeout=30)
        assert r.status_code == 502 and "went away" in r.json()["error"]["message"], r.text
        dp.workers.remove(victim)  # nothing left to check on it
        wait_health(rp, victim, False)
        survivor = dp.workers[0]
        before = rp.counts()[survivor]
        for q in ("A?", "B?", "C?"):
            assert gen(rp.url, q).status_code == 200
        assert rp.counts()[survivor] == before + 3
        assert 'sgl_router_worker_healthy{worker="%s"} 0' % victim in httpx.get(rp.url + "/metrics").text
        with httpx.stream("POST", dp.handle.url + "/generate", timeout=60, json={  # the dp front too
                "text": "Hi", "stream": True, "sampling_params": {"max_new_tokens": 2}}) as resp:
            assert resp.status_code in (200, 502)  # 502 if its router still thought the victim alive
    finally:
        stop_router(rp)


def test_router_forgets_what_a_replica_evicted(dp: DP) -> None:
    """A replica's evictions reach the router's tree (its /cache_evictions, polled with the health probe):
    a prefix the replica no longer holds is no longer routed to it as a cache hit."""
    rp = start_router(dp.workers, "--policy", "cache_aware")
    try:
        first = gen(rp.url, SYSTEM + "Paris?")
        assert first.status_code == 200, first.text
        counts = rp.counts()
        owner = next(w for w, n in counts.items() if n == 1)

        def wait_router(key: str, at_least: int) -> None:  # the router's eviction_polls / eviction_cursor
            end = time.monotonic() + 30
            while next(w for w in rp.info()["workers"] if w["url"] == owner)[key] < at_least:
                assert time.monotonic() < end, f"the router's {key} never reached {at_least}"
                time.sleep(0.1)
        polls = next(w for w in rp.info()["workers"] if w["url"] == owner)["eviction_polls"]
        wait_router("eviction_polls", polls + 2)  # a whole poll after the routing: the entry predates it
        cursor = httpx.get(owner + "/cache_evictions", timeout=30).json()["cursor"]
        assert httpx.post(owner + "/flush_cache", timeout=30).status_code == 200  # behind the router's back
        ev = httpx.get(owner + "/cache_evictions", params={"since": cursor}, timeout=30).json()
        assert ev["cursor"] > cursor and ev["lost"] == 0
        # leaves first: "...Paris?<output>" (kept: the shared system prompt), then the system prompt (kept 0)
        assert any(e["text"].startswith(SYSTEM + "Paris?") for e in ev["events"]), ev
        assert any(e["kept"] == 0 and SYSTEM.startswith(e["text"][:50]) for e in ev["events"]), ev
        assert httpx.get(owner + "/cache_evictions", params={"since": -1}, timeout=30).status_code == 400
        wait_router("eviction_cursor", ev["cursor"])
        gen(rp.url, SYSTEM + "Rome?")
        metrics = httpx.get(rp.url + "/metrics").text
        assert 'decision="cache_hit"' not in metrics and 'decision="low_match"} 2' in metrics, metrics
    finally:
        stop_router(rp)

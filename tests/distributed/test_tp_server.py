"""`sgl serve --tp-size 2` on the default model: greedy outputs equal one rank's, and a rank that dies
takes the server down with a clear log line instead of a hang."""

from __future__ import annotations

import os
import signal
import threading
import time

import httpx
import pytest

from tests.e2e.server_helpers import start_server

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Three primary colors are"]
GREEDY = {"max_new_tokens": 16, "temperature": 0}


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(c) for c in f.read().split()]


def _wait_exit(pid: int, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split(") ")[1].startswith("Z"):
                    return True  # exited, not yet reaped
        except FileNotFoundError:
            return True
        time.sleep(0.1)
    return False


@pytest.fixture(scope="module")
def reference() -> list[list[int]]:
    from sgl.runtime.engine import Engine

    with Engine(model_path="default", num_threads=1, max_total_tokens=4096, show_progress=False) as eng:
        return [eng.generate(p, GREEDY)["output_ids"] for p in PROMPTS]


def test_tp2_greedy_equals_tp1_then_a_dead_rank_stops_the_server(reference) -> None:
    server = start_server("--tp-size", "2", "--num-threads", "2")
    try:
        (rank1,) = _children(server.proc.pid)
        r = httpx.post(server.url + "/generate", json={"text": PROMPTS, "sampling_params": GREEDY}, timeout=120)
        assert r.status_code == 200, r.text
        assert [o["output_ids"] for o in r.json()] == reference
        assert httpx.get(server.url + "/server_info", timeout=10).json()["tp_size"] == 2
        server.wait_idle()
        assert httpx.get(server.url + "/check_integrity", timeout=30).json()["ok"] is True
        assert "tensor-parallel rank 1 ready: 3 heads, 1 kv heads" in server.log()  # SmolLM2: 3 GQA groups, 2 + 1

        # now rank 1 dies in the middle of a generation
        results: list[object] = []

        def long_request() -> None:
            try:
                results.append(httpx.post(server.url + "/generate", timeout=60, json={
                    "text": "Tell me a long story", "sampling_params": {"max_new_tokens": 400, "ignore_eos": True}}))
            except httpx.HTTPError as e:
                results.append(e)

        t = threading.Thread(target=long_request)
        t.start()
        time.sleep(1.0)  # decoding is under way
        os.kill(rank1, signal.SIGKILL)
        assert server.proc.wait(timeout=60) == 1  # not a hang: the server exits, code 1
        t.join(timeout=30)
        assert not t.is_alive()
        log = server.log()
        assert "CRITICAL" in log and "tensor-parallel rank 1" in log and "exited with code -9" in log, log[-3000:]
        res = results[0]  # the request in flight ended: aborted, or the connection closed on shutdown
        if isinstance(res, httpx.Response):
            assert res.status_code != 200 or res.json()["meta_info"]["finish_reason"]["type"] == "abort", res.text
    finally:
        server.stop()


@pytest.mark.parametrize("algorithm", ["EAGLE", "MEDUSA"])
def test_tp2_with_a_head_drafter_equals_tp1(reference, algorithm: str) -> None:
    """EAGLE's and MEDUSA's heads read their draft vocabulary's rows of the target's lm_head, which tensor
    parallelism splits over the ranks: rank 0 keeps it whole until the drafter is built (TensorParallel.attach).
    (Before, the engine did not start: 'TPDriver' object has no attribute 'lm_head'.)"""
    from sgl.runtime.engine import Engine

    with Engine(model_path="default", tp_size=2, num_threads=2, max_total_tokens=4096, show_progress=False,
                speculative_algorithm=algorithm, speculative_always_draft=True) as eng:
        outs = eng.generate(PROMPTS, [GREEDY] * len(PROMPTS))
        assert [o["output_ids"] for o in outs] == reference
        assert all(o["meta_info"]["spec_verify_ct"] > 0 for o in outs)
        assert eng.tp.driver.whole_lm_head is None  # dropped once the drafter took its rows
        eng.wait_idle()
        eng.check_integrity()


def test_lora_at_tp2_is_refused_at_start_and_at_load(tmp_path) -> None:
    """Adapters are not split over the ranks: a LoRA request at --tp-size 2 failed on rank 0 mid-step ('Bad in-place
    call: input tensor size [11, 640] and output tensor size [11, 960]'), rank 1 waited in its all-reduce until the
    group timeout, and the engine died. Now --lora-paths is refused at start and /load_lora_adapter with a 400."""
    from sgl.runtime.config import ServerArgs
    from sgl.runtime.engine import Engine
    from sgl.runtime.lora.adapter import AdapterError

    with pytest.raises(ValueError, match="lora_paths with tp_size > 1"):
        ServerArgs(model_path="default", tp_size=2, lora_paths=[f"a={tmp_path}"])
    with Engine(model_path="default", tp_size=2, num_threads=2, max_total_tokens=1024, show_progress=False) as eng:
        with pytest.raises(AdapterError, match="lora_name: adapters cannot be loaded at tp_size 2"):
            eng.load_lora_adapter("a", str(tmp_path))
        out = eng.generate(PROMPTS[0], GREEDY)  # the ranks are fine
        assert out["meta_info"]["finish_reason"]["type"] == "length"


def test_a_dead_rank_0_takes_the_followers_with_it() -> None:
    server = start_server("--tp-size", "2", "--num-threads", "2")
    try:
        (rank1,) = _children(server.proc.pid)
        server.proc.kill()  # SIGKILL: rank 0 sends no stop
        server.proc.wait(timeout=10)
        assert _wait_exit(rank1, timeout=15), "rank 1 outlived rank 0"
    finally:
        server.stop()

"""Crash safety through the real HTTP app and engine on the default model. A failure is injected into the
model runner (a stand-in for a kernel bug): a request that makes the forward pass fail gets a 500 naming the
error while a concurrent request completes unharmed; two whole-step failures in a row stop the engine
loudly (fatal_error set, the server's on_fatal hook called) instead of serving with /health green. A
one-request step that fails is that request's failure (500), never counted against the engine."""

from __future__ import annotations

import concurrent.futures
from typing import Any, Iterator

import pytest
from fastapi.testclient import TestClient

from sgl.runtime.engine import Engine
from sgl.runtime.server.app import create_app


# NOTE: not named `engine`: the conftest's after-test integrity check cannot run on an engine the test stopped;
# the first test checks integrity itself.
@pytest.fixture(scope="module")
def faulty_engine() -> Iterator[Engine]:
    eng = Engine(model_path="default", num_threads=1, max_total_tokens=4096, show_progress=False)
    real_run = eng.scheduler.runner.run
    eng.broken = False  # type: ignore[attr-defined]

    def run(batch: Any) -> Any:
        if eng.broken or any(row.req.rid.startswith("poison") for row in batch.rows):  # type: ignore[attr-defined]
            raise RuntimeError("kernel exploded")
        return real_run(batch)

    eng.scheduler.runner.run = run  # type: ignore[method-assign]
    yield eng
    eng.shutdown()


def generate(c: TestClient, rid: str, text: str = "The capital of France is") -> Any:
    return c.post("/generate", json={"text": text, "rid": rid,
                                     "sampling_params": {"max_new_tokens": 8, "temperature": 0}})


def test_the_failing_request_gets_a_500_and_the_others_finish(faulty_engine: Engine) -> None:
    engine = faulty_engine
    with TestClient(create_app(engine, engine.server_args)) as c:
        alone = generate(c, "warm").json()["output_ids"]
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(generate, c, rid) for rid in ("n1", "poison-1", "n2", "poison-2")]
            replies = {rid: f.result() for rid, f in zip(("n1", "poison-1", "n2", "poison-2"), futures)}
        for rid in ("poison-1", "poison-2"):
            r = replies[rid]
            assert r.status_code == 500 and "kernel exploded" in r.json()["error"]["message"], r.text
        for rid in ("n1", "n2"):
            assert replies[rid].status_code == 200 and replies[rid].json()["output_ids"] == alone
        assert c.get("/health").status_code == 200
        assert engine.fatal_error is None
    engine.wait_idle(timeout=60)
    engine.check_integrity()


def test_two_whole_step_failures_in_a_row_stop_the_engine(faulty_engine: Engine) -> None:
    engine = faulty_engine
    stopped: list[str] = []
    engine.on_fatal = stopped.append
    engine.broken = True  # type: ignore[attr-defined]
    with TestClient(create_app(engine, engine.server_args)) as c:
        alone = generate(c, "x0")  # one request alone: its own failure, never the engine's
        assert alone.status_code == 500 and "kernel exploded" in alone.text
        assert engine.fatal_error is None
        # two prompts in one request share a step: both failing alone means the step itself is broken
        first = c.post("/generate", json={"text": ["Hello", "Goodbye"], "sampling_params": {"max_new_tokens": 4}})
        assert first.status_code == 500 and "kernel exploded" in first.text
        assert engine.fatal_error is None  # one broken step: the server keeps serving
        second = c.post("/generate", json={"text": ["Hi", "Bye"], "sampling_params": {"max_new_tokens": 4}})
        assert second.status_code == 500 and "engine stopped" in second.text, second.text
    assert engine.fatal_error is not None and "twice in a row" in engine.fatal_error
    assert stopped and "kernel exploded" in stopped[0]

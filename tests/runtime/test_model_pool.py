"""The pool's load/unload policy, the router's rules and model-name parsing, without weights (fast).

Engines here are stand-ins with a fixed size (the pool's `engine_factory` hook): the policy under test is the
pool's; real engines under the same policy run in tests/e2e/test_multi_model.py.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import Any

import pytest

from sgl.runtime.config import ServerArgs
from sgl.runtime.model_names import ModelSpec, parse_model_spec, read_models_file, resolve_model_name
from sgl.runtime.model_pool import ModelPool
from sgl.runtime.model_router import ModelRouter, ModelRule, RouteFeatures
from sgl.runtime.protocol import RequestError

MB = 2**20


class SizedEngine:
    """Holds `size` bytes; records integrity checks and shutdowns."""

    def __init__(self, args: Any, log: list[str]) -> None:
        self.args, self.log = args, log
        log.append(f"load {args.served_model_name}")

    def wait_idle(self, timeout: float = 60.0) -> None:
        pass

    def check_integrity(self) -> None:
        self.log.append(f"check {self.args.served_model_name}")

    def shutdown(self) -> None:
        self.log.append(f"unload {self.args.served_model_name}")


def make_pool(sizes: dict[str, int], budget: int, fair_wait_s: float = 5.0) -> tuple[ModelPool, list[str]]:
    log: list[str] = []
    specs = [ModelSpec(name, "default") for name in sizes]
    pool = ModelPool(specs, ServerArgs(), budget_bytes=budget, engine_factory=lambda a: SizedEngine(a, log),
                     tokenizer_loader=lambda path: (None, f"/models/{path}", None), fair_wait_s=fair_wait_s)
    for name, size in sizes.items():
        pool.slots[name].size_bytes, pool.slots[name].measured = size, True
    return pool, log


def test_lru_idle_model_is_unloaded_after_an_integrity_check() -> None:
    pool, log = make_pool({"a": 100 * MB, "b": 100 * MB, "c": 100 * MB}, budget=250 * MB)

    async def use(name: str) -> None:
        await pool.acquire(name)
        pool.release(name)

    async def run() -> None:
        for name in ("a", "b", "a", "c"):  # c evicts b: a was used more recently
            await use(name)
            await asyncio.sleep(0.01)

    asyncio.run(run())
    assert pool.resident_names() == ["a", "c"]
    assert log == ["load a", "load b", "check b", "unload b", "load c"]
    assert (pool.slots["a"].loads, pool.slots["b"].unloads) == (1, 1)


def test_a_busy_model_is_not_unloaded_the_next_waits() -> None:
    pool, log = make_pool({"a": 100 * MB, "b": 100 * MB}, budget=150 * MB)

    async def run() -> list[str]:
        order: list[str] = []
        await pool.acquire("a")  # a request running on a
        waiter = asyncio.create_task(pool.acquire("b"))
        await asyncio.sleep(0.2)
        assert not waiter.done() and pool.resident_names() == ["a"], "b waits while a is busy"
        order.append("a done")
        pool.release("a")
        await asyncio.wait_for(waiter, 5)
        order.append("b loaded")
        pool.release("b")
        return order

    assert asyncio.run(run()) == ["a done", "b loaded"]
    assert log == ["load a", "check a", "unload a", "load b"]


def test_a_waiting_model_is_not_starved_by_a_stream_for_the_resident_one() -> None:
    """Requests for a overlap without a gap (a is never idle); b waits at most fair_wait_s, then a drains:
    its running request finishes, it is unloaded, b loads; a's next requests wait their turn and get a back."""
    pool, log = make_pool({"a": 100 * MB, "b": 100 * MB}, budget=150 * MB, fair_wait_s=0.3)

    async def one_a() -> None:
        await pool.acquire("a")
        await asyncio.sleep(0.1)
        pool.release("a")

    async def run() -> tuple[float, int, int]:
        stop = asyncio.Event()

        async def stream() -> int:  # a new request for a every 0.05 s, each running 0.1 s
            tasks = []
            while not stop.is_set():
                tasks.append(asyncio.create_task(one_a()))
                await asyncio.sleep(0.05)
            await asyncio.gather(*tasks)
            return len(tasks)

        streaming = asyncio.create_task(stream())
        await asyncio.sleep(0.2)
        t0 = asyncio.get_running_loop().time()
        await asyncio.wait_for(pool.acquire("b"), 3.0)  # without fairness: waits until the stream ends (never)
        waited = asyncio.get_running_loop().time() - t0
        pool.release("b")
        await asyncio.sleep(0.5)  # a's requests queued behind the drain now run again, on a reloaded a
        stop.set()
        sent = await asyncio.wait_for(streaming, 5.0)
        return waited, sent, pool.slots["a"].loads

    waited, sent, a_loads = asyncio.run(run())
    assert 0.3 <= waited < 1.5, waited  # bounded: fair_wait_s plus the drained request's 0.1 s
    assert log[:6] == ["load a", "check a", "unload a", "load b", "check b", "unload b"] and a_loads == 2
    assert sent > 10 and all(s.in_use == 0 and s.waiting == 0 and not s.draining for s in pool.slots.values())


def test_a_model_over_the_budget_is_a_request_error() -> None:
    pool, _ = make_pool({"a": 100 * MB, "huge": 400 * MB}, budget=150 * MB)
    with pytest.raises(RequestError, match="model: 'huge' needs 0.39 GB, over --model-memory-budget 0.15 GB"):
        asyncio.run(pool.acquire("huge"))
    assert pool.slots["huge"].in_use == 0


def test_resolve_model_name() -> None:
    assert resolve_model_name(None, ["a", "b"]) == ("a", None)
    assert resolve_model_name("b", ["a", "b"]) == ("b", None)
    assert resolve_model_name("a:sql-lora", ["a", "b"]) == ("a", "sql-lora")
    with pytest.raises(RequestError, match="model: 'c' is not served; served models: a, b"):
        resolve_model_name("c", ["a", "b"])


def test_model_specs_and_cli() -> None:
    assert parse_model_spec("small=default") == ModelSpec("small", "default")
    assert parse_model_spec("/m/x=1.gguf") == ModelSpec("/m/x=1.gguf", "/m/x=1.gguf")  # a path with '='
    p = argparse.ArgumentParser()
    ServerArgs.add_cli_args(p)
    one = ServerArgs.from_cli_args(p.parse_args(["--model-path", "tiny=default"]))
    assert (one.model_path, one.served_model_name, one.model_paths) == ("default", "tiny", None)
    two = ServerArgs.from_cli_args(p.parse_args(["--model-path", "a=default", "--model-path", "b.gguf"]))
    assert (two.model_path, two.model_paths) == ("default", ["a=default", "b.gguf"])


def test_models_file(tmp_path) -> None:
    f = tmp_path / "models.json"
    f.write_text(json.dumps([{"name": "s", "model_path": "default", "max_total_tokens": 512}]))
    assert read_models_file(str(f)) == [ModelSpec("s", "default", {"max_total_tokens": 512})]
    f.write_text(json.dumps([{"name": "s"}]))
    with pytest.raises(ValueError, match=r"models\[0\]"):
        read_models_file(str(f))


def _features(prompt: int, max_new: int = 16, constraint: str = "none", text: str = "") -> RouteFeatures:
    return RouteFeatures({"small": prompt, "mid": prompt, "big": prompt}, max_new, constraint, text)


def test_router_rules_table() -> None:
    router = ModelRouter.from_dict({
        "models": {"big": {"cost_per_1k": 1.0},
                   "small": {"cost_per_1k": 0.1, "max_prompt_tokens": 100, "max_new_tokens": 64,
                             "constraints": ["none", "regex"], "max_score": 0.5},
                   "mid": {"cost_per_1k": 0.3, "max_prompt_tokens": 1000}},
        "classifier": {"keywords": {"prove": 0.6}}}, served=["small", "mid", "big"])
    table = [
        (_features(10), "small"),
        (_features(500), "mid"),  # too long for small
        (_features(5000), "big"),  # too long for mid
        (_features(10, max_new=100), "mid"),
        (_features(10, constraint="regex"), "small"),
        (_features(10, constraint="json_schema"), "mid"),
        (_features(10, text="Prove that"), "mid"),  # score 0.6 > small's max_score
    ]
    for features, want in table:
        assert router.choose(features).model == want, features
    d = router.choose(_features(500))
    assert d.rejected == {"small": "prompt 500 > 100 tokens"} and d.cost == pytest.approx(0.3 * 516 / 1000)


def test_router_errors() -> None:
    router = ModelRouter({"small": ModelRule(0.1, max_prompt_tokens=8)})
    with pytest.raises(RequestError, match="model: 'auto' found no served model .*small: prompt 9 > 8"):
        router.choose(RouteFeatures({"small": 9}, 1))
    with pytest.raises(ValueError, match="router_config.models.x: not a served model"):
        ModelRouter.from_dict({"models": {"x": {"cost_per_1k": 1}}}, served=["a"])
    with pytest.raises(ValueError, match="unknown field"):
        ModelRouter.from_dict({"models": {"a": {"cost_per_1k": 1, "max_prompt": 3}}}, served=["a"])


def test_default_router_sends_long_and_grammar_heavy_requests_to_the_largest() -> None:
    router = ModelRouter.default(["small", "mid", "big"], {"small": 0.1, "mid": 0.5, "big": 2.0})
    assert router.choose(_features(10)).model == "small"
    assert router.choose(_features(2000)).model == "big"
    assert router.choose(_features(10, max_new=1000)).model == "big"
    assert router.choose(_features(10, constraint="ebnf")).model == "big"
    assert router.choose(_features(10, constraint="json_schema")).model == "small"


@pytest.mark.parametrize("module", ["sgl.runtime.model_names", "sgl.runtime.model_router", "sgl.runtime.models.gemma3"])
def test_doctests(module: str) -> None:
    import doctest
    import importlib

    assert doctest.testmod(importlib.import_module(module)).failed == 0


def test_an_underestimated_model_evicts_idle_others_once_measured(monkeypatch: pytest.MonkeyPatch) -> None:
    pool, log = make_pool({"a": 100 * MB, "b": 100 * MB}, budget=250 * MB)
    pool.slots["b"].measured = False
    pool.slots["b"].size_bytes = 10 * MB  # the file-size estimate; once loaded it measures 200 MB
    sizes = {"a": 100 * MB, "b": 200 * MB}
    monkeypatch.setattr("sgl.runtime.model_pool.engine_memory_bytes", lambda e: sizes[e.args.served_model_name])

    async def run() -> None:
        for name in ("a", "b"):
            await pool.acquire(name)
            pool.release(name)

    asyncio.run(run())
    assert pool.resident_names() == ["b"] and log == ["load a", "load b", "check a", "unload a"]

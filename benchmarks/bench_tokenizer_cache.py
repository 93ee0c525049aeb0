"""GGUF tokenizer load: built from the file's vocabulary (what every model load did before) vs the on-disk
cache (a new process) vs the built tokenizer shared within the process (a reload after an LRU unload).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_tokenizer_cache.py --models default gemma3-270m --engine

`--engine` also times a whole engine load (weights, KV pool, grammar vocabulary) three ways: cold (nothing
cached: what every load cost before), a new process (the disk cache only) and a reload in the same process
(an LRU unload then load: the built tokenizer and grammar vocabulary are shared).

Gemma 3 (`make gemma`) is the case that matters: 262,144 SentencePiece tokens whose BPE merges are derived
in Python. Each case is timed `--repeats` times (median); the cache lives in a fresh temporary folder.
JSON to benchmarks/results/bench_tokenizer_cache.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from typing import Any, Callable

RESULTS = os.path.join(os.path.dirname(__file__), "results", "bench_tokenizer_cache.json")


def _median_seconds(fn: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench(model: str, repeats: int) -> dict[str, Any]:
    from sgl.runtime import tokenizer_gguf
    from sgl.runtime.models.default_model import resolve_model_path
    from sgl.runtime.models.gguf_file import GGUFFile
    from sgl.runtime.tokenizer import Tokenizer

    meta = GGUFFile(resolve_model_path(model)).metadata

    def build() -> None:
        tokenizer_gguf.build_gguf_backend(meta)

    def from_disk() -> None:
        tokenizer_gguf._BUILT.clear()  # as a new process: only the disk cache
        Tokenizer.from_gguf(meta)

    Tokenizer.from_gguf(meta)  # fills the disk cache
    built = _median_seconds(build, repeats)
    disk = _median_seconds(from_disk, repeats)
    shared = _median_seconds(lambda: Tokenizer.from_gguf(meta), repeats)
    return {"model": model, "vocab": len(meta["tokenizer.ggml.tokens"]), "build_s": round(built, 3),
            "disk_cache_s": round(disk, 3), "in_process_s": round(shared, 4),
            "disk_vs_build": round(disk / built, 3), "in_process_vs_build": round(shared / built, 4)}


def bench_engine(model: str) -> dict[str, Any]:
    from sgl.runtime import engine_setup, tokenizer_gguf
    from sgl.runtime.engine import Engine

    def load(fresh_disk: bool, clear_memo: bool) -> float:
        if fresh_disk:
            os.environ["SGL_CACHE_DIR"] = tempfile.mkdtemp(prefix="sgl-tok-bench-")
        if clear_memo:
            tokenizer_gguf._BUILT.clear()
            engine_setup._VOCABS.clear()
        t0 = time.perf_counter()
        engine = Engine(model_path=model, num_threads=int(os.environ.get("OMP_NUM_THREADS", "1")),
                        max_total_tokens=2048, show_progress=False)
        seconds = time.perf_counter() - t0
        engine.shutdown()
        return seconds

    # NOTE: imports first (torch, the model runner, the grammar backends): the process's first engine would
    # otherwise count them in its "cold" load
    import sgl.grammars  # noqa: F401
    import sgl.runtime.executor.model_runner  # noqa: F401
    import sgl.runtime.models.loader  # noqa: F401

    cold = load(fresh_disk=True, clear_memo=True)
    new_process = load(fresh_disk=False, clear_memo=True)
    reload = load(fresh_disk=False, clear_memo=False)
    return {"model": model, "cold_s": round(cold, 2), "new_process_s": round(new_process, 2),
            "reload_s": round(reload, 2), "new_process_vs_cold": round(new_process / cold, 3),
            "reload_vs_cold": round(reload / cold, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["default", "gemma3-270m"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--engine", action="store_true", help="also time whole engine loads (cold / new process / reload)")
    args = ap.parse_args()
    os.environ["SGL_CACHE_DIR"] = tempfile.mkdtemp(prefix="sgl-tok-bench-")
    load = os.getloadavg()[0]
    threads = int(os.environ.get("OMP_NUM_THREADS", "0")) or None
    rows = []
    for model in args.models:
        try:
            rows.append(bench(model, args.repeats))
        except (FileNotFoundError, ValueError) as e:  # gemma3-270m without `make gemma`
            print(f"{model}: skipped ({e})")
    print(f"threads {threads}, load average {load:.1f}; median of {args.repeats}")
    print("| model | vocab | build s | disk cache s (ratio) | in process s (ratio) |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['vocab']:,} | {r['build_s']} | {r['disk_cache_s']} ({r['disk_vs_build']}x) | "
              f"{r['in_process_s']} ({r['in_process_vs_build']}x) |")
    engines = []
    for model in args.models if args.engine else []:
        try:
            engines.append(bench_engine(model))
        except (FileNotFoundError, ValueError) as e:
            print(f"{model}: skipped ({e})")
    if engines:
        print(f"\nengine load (threads {threads}, load average now {os.getloadavg()[0]:.1f})")
        print("| model | cold s | new process s (ratio) | reload in process s (ratio) |\n|---|---|---|---|")
        for r in engines:
            print(f"| {r['model']} | {r['cold_s']} | {r['new_process_s']} ({r['new_process_vs_cold']}x) | "
                  f"{r['reload_s']} ({r['reload_vs_cold']}x) |")
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS, "w") as f:
        json.dump({"threads": threads, "load_average": round(load, 2), "repeats": args.repeats, "tokenizer": rows,
                   "engine_load": engines}, f, indent=2)


if __name__ == "__main__":
    main()

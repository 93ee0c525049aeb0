"""fp32 vs native weights on the default model: batch-1 decode, 512-token prefill, resident set, per-token split.

Each (format, threads) cell runs in its own process (clean RSS, torch's thread pool set once), the two
formats interleaved, median of `--repeats`. Decode: a 64-token prompt, then 128 greedy tokens, one
forward + argmax per token (the model, without scheduler or sampler: those are the same in both
formats). Prefill: one forward of a 512-token prompt. RSS: an Engine (KV pool fixed at 4096 slots)
after one request. Split: over 32 decode steps, wall time inside the model's `linear` calls (every
matmul: torch.mm/addmm or the kernels' quant_linear, with launcher) vs the rest of the step.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/bench_weight_formats.py --threads 1 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

RESULTS = os.path.join(os.path.dirname(__file__), "results", "weight_formats.json")


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def cell(fmt: str, threads: int) -> dict:
    """One measurement in this process."""
    import torch

    torch.set_num_threads(threads)
    from sgl.runtime.executor.forward_batch import ForwardBatch
    from sgl.runtime.executor.kv_cache import KVCache
    from sgl.kernels.cpu import extension_available
    from sgl.runtime.models.loader import load_model

    loaded = load_model("default", show_progress=False, weight_format=fmt)
    model, cfg = loaded.model, loaded.config
    kv = KVCache.for_model(cfg, num_slots=1024, dtype=torch.float32)
    prompt = [(i * 37) % 4000 + 100 for i in range(64)]

    def decode(n: int) -> float:
        fb = ForwardBatch.from_lists([prompt], [list(range(64))])
        tok = int(model.compute_logits(model.forward(fb, kv)[fb.last_token_indices]).argmax())
        t0, c0 = time.perf_counter(), time.process_time()
        for i in range(n):
            fb = ForwardBatch.from_lists([[tok]], [list(range(65 + i))])
            tok = int(model.compute_logits(model.forward(fb, kv)).argmax())
        return n / (time.perf_counter() - t0), (time.process_time() - c0) / n

    decode(8)  # warm
    decode_tps, decode_cpu = decode(128)
    long = [(i * 53) % 4000 + 100 for i in range(512)]
    fb = ForwardBatch.from_lists([long], [list(range(512))])
    model.compute_logits(model.forward(fb, kv)[fb.last_token_indices])  # warm
    t0, c0 = time.perf_counter(), time.process_time()
    model.compute_logits(model.forward(fb, kv)[fb.last_token_indices])
    prefill_tps, prefill_cpu = 512 / (time.perf_counter() - t0), time.process_time() - c0

    # per-token split: wall time inside the model's `linear` calls (every matmul, with its launcher)
    import sgl.runtime.models.llama as llama_mod

    inner, spent = llama_mod.linear, [0.0]

    def timed_linear(*args, **kwargs):
        t = time.perf_counter()
        out = inner(*args, **kwargs)
        spent[0] += time.perf_counter() - t
        return out

    llama_mod.linear = timed_linear
    fb0 = ForwardBatch.from_lists([prompt], [list(range(64))])
    tok = int(model.compute_logits(model.forward(fb0, kv)[fb0.last_token_indices]).argmax())
    spent[0] = 0.0
    steps = 32
    t0 = time.perf_counter()
    for i in range(steps):
        fb = ForwardBatch.from_lists([[tok]], [list(range(65 + i))])
        tok = int(model.compute_logits(model.forward(fb, kv)).argmax())
    wall = (time.perf_counter() - t0) / steps
    llama_mod.linear = inner
    mm = spent[0] / steps
    return {"format": loaded.weight_format, "threads": threads, "decode_tok_s": decode_tps,
            "prefill_tok_s": prefill_tps, "step_ms": wall * 1e3, "matmul_ms_per_token": mm * 1e3,
            "decode_cpu_ms_per_token": decode_cpu * 1e3, "prefill512_cpu_s": prefill_cpu, "extension": extension_available()}


def engine_rss(fmt: str) -> dict:
    from sgl.runtime.engine import Engine

    eng = Engine(model_path="default", num_threads=1, max_total_tokens=4096, show_progress=False, weight_format=fmt)
    eng.generate("Hello there", {"max_new_tokens": 8, "temperature": 0})
    out = {"format": eng.weight_format, "rss_mb": _rss_mb()}
    eng.shutdown()
    return out


def _run(args: list[str]) -> dict:
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    out = subprocess.run([sys.executable, __file__, *args], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cell", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--rss", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.cell:
        print(json.dumps(cell(a.cell[0], int(a.cell[1]))))
        return
    if a.rss:
        print(json.dumps(engine_rss(a.rss)))
        return
    rows = []
    for threads in a.threads:
        runs: dict[str, list[dict]] = {"fp32": [], "native": []}
        for _ in range(a.repeats):
            for fmt in ("fp32", "native"):
                runs[fmt].append(_run(["--cell", fmt, str(threads)]))
        for fmt, rs in runs.items():
            row = {k: statistics.median(r[k] for r in rs) for k in rs[0] if isinstance(rs[0][k], float)}
            row["extension"] = rs[0]["extension"]
            rows.append({"format": fmt, "threads": threads, **row})
    rss = {fmt: _run(["--rss", fmt])["rss_mb"] for fmt in ("fp32", "native")}
    print(f"{'format':8} {'threads':>7} {'decode tok/s':>12} {'CPU ms/tok':>10} {'prefill512 tok/s':>16} "
          f"{'CPU s':>6} {'step ms':>8} {'matmul ms':>9}")
    for r in rows:
        print(f"{r['format']:8} {r['threads']:>7} {r['decode_tok_s']:>12.1f} {r['decode_cpu_ms_per_token']:>10.1f} "
              f"{r['prefill_tok_s']:>16.1f} {r['prefill512_cpu_s']:>6.2f} {r['step_ms']:>8.2f} {r['matmul_ms_per_token']:>9.2f}")
    for threads in a.threads:
        f, n = [next(r for r in rows if r["format"] == fmt and r["threads"] == threads) for fmt in ("fp32", "native")]
        print(f"threads {threads}: native/fp32 decode {n['decode_tok_s'] / f['decode_tok_s']:.2f}x, "
              f"prefill {n['prefill_tok_s'] / f['prefill_tok_s']:.2f}x")
    print(f"Engine RSS: fp32 {rss['fp32']:.0f} MB, native {rss['native']:.0f} MB ({rss['native'] / rss['fp32']:.2f}x)")
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS, "w") as f:
        json.dump({"rows": rows, "rss_mb": rss, "repeats": a.repeats, "load_avg": os.getloadavg()}, f, indent=1)


if __name__ == "__main__":
    main()

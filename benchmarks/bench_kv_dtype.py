"""The KV pool's element type, fp16 vs fp32 (`--kv-cache-dtype`), on the default model with native weights.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_kv_dtype.py [--threads 1] [--rounds 2] [--context 1024]

One Engine per dtype in this process, alternated `--rounds` times (best round per cell): batch-1 decode of 64
tokens after a short prompt and after a `--context`-token prompt (where the attention's KV bytes matter),
and 16 concurrent requests x 64 tokens over that long prompt's prefix (a decode batch whose every row reads
the ~context-token KV). Figures are output tokens per CPU-second of the process (the machine is shared:
CPU time moves less with the load than wall time), the fp32 pool the baseline; plus the KV pool's resident
MB after the runs and whether the two pools' greedy tokens agree. JSON: benchmarks/results/bench_kv_dtype.json.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

ROOT = Path(__file__).resolve().parents[1]
SHORT = "<|im_start|>user\nWrite a short story about a lighthouse keeper.<|im_end|>\n<|im_start|>assistant\n"


def long_prompt(tokens: int) -> str:
    return "alpha bravo charlie delta echo " * (tokens // 7) + "\nSummarize the list above:"


def cell(eng: Any, prompts: list[str], new: int) -> tuple[float, list[list[int]]]:
    """Output tokens per CPU-second of generating `new` tokens for every prompt at once (prompts cached)."""
    params = {"max_new_tokens": new, "temperature": 0, "ignore_eos": True}
    eng.generate(prompts, dict(params, max_new_tokens=1))  # prefill (and cache) first: decode only below
    eng.wait_idle()
    c0 = time.process_time()
    outs = eng.generate(prompts, params)
    cpu = time.process_time() - c0
    return sum(len(o["output_ids"]) for o in outs) / cpu, [o["output_ids"] for o in outs]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    a = ap.parse_args()
    import torch

    from sgl.runtime.engine import Engine

    torch.set_num_threads(a.threads)
    dtypes = ("fp32", "fp16")
    engines = {d: Engine(num_threads=a.threads, show_progress=False, kv_cache_dtype=d, max_total_tokens=65536)
                for d in dtypes}
    longp = long_prompt(a.context)
    work = {"batch 1, short prompt": ([SHORT], a.new),
            f"batch 1, {a.context}-token prompt": ([longp], a.new),
            f"batch {a.batch}, {a.context}-token shared prefix": ([longp + f" ({i})" for i in range(a.batch)], a.new)}
    best: dict[str, dict[str, float]] = {w: {} for w in work}
    tokens: dict[str, dict[str, list[list[int]]]] = {w: {} for w in work}
    load0 = os.getloadavg()
    for _ in range(a.rounds):
        for name, (prompts, new) in work.items():
            for d in dtypes:  # alternated: drift in the machine's load hits both
                tps, ids = cell(engines[d], prompts, new)
                best[name][d] = max(best[name].get(d, 0.0), tps)
                tokens[name][d] = ids
    resident = {d: engines[d].scheduler.runner.kv.resident_bytes() / 2**20 for d in dtypes}
    for e in engines.values():
        e.shutdown()
    load1 = os.getloadavg()
    print(f"\nbench_kv_dtype ({a.threads} thread(s), load {load0[0]:.1f} -> {load1[0]:.1f}): output tok per CPU-s, "
          f"best of {a.rounds}")
    print("| workload | fp32 pool | fp16 pool | fp16 / fp32 | greedy tokens equal |")
    print("|---|---|---|---|---|")
    rows = []
    for name in work:
        f32, f16 = best[name]["fp32"], best[name]["fp16"]
        same = tokens[name]["fp32"] == tokens[name]["fp16"]
        rows.append({"workload": name, "fp32": f32, "fp16": f16, "ratio": f16 / f32, "tokens_equal": same})
        print(f"| {name} | {f32:.1f} | {f16:.1f} | {f16 / f32:.2f}x | {same} |")
    print(f"| KV pool resident MB after the runs | {resident['fp32']:.1f} | {resident['fp16']:.1f} | "
          f"{resident['fp16'] / max(resident['fp32'], 1e-9):.2f}x | |")
    out = ROOT / "benchmarks" / "results" / "bench_kv_dtype.json"
    out.write_text(json.dumps({"threads": a.threads, "load_avg_start": load0, "load_avg_end": load1,
                               "rounds": a.rounds, "context": a.context, "rows": rows, "kv_resident_mb": resident},
                              indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

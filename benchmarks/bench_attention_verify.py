"""Attention of a speculative verify step's rows (kernels/cpu/attention_rows.h): per row vs grouped, AVX2 vs AVX-512.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_attention_verify.py [--threads 1] [--contexts 32,300,800]
        [--draft 8] [--rounds 3]

One sequence's 1 + `--draft` chain rows (row j attends to the table up to the context + j) with the default
model's attention shape (9 query heads, 3 kv heads, head_dim 64) over 30 layers, each with its own fp32 pool,
through decode_attention (the kernel decode_rows runs per layer). Two table layouts: contiguous (a request's
prompt after prefill) and scattered (random slots). Four builds of the same kernel, each in its own process
(the switches are read once per process), alternating per round; the median of the rounds:
  per-row AVX2     SGL_CPU_ATTN_NO_GROUPS=1 SGL_CPU_ATTN_NO_ZMM=1: each row alone (attend_heads), as before
  per-row AVX-512  SGL_CPU_ATTN_NO_GROUPS=1
  grouped AVX2     SGL_CPU_ATTN_NO_ZMM=1: the rows as one group reading the shared K/V once
  grouped AVX-512  (default)
Every variant gives the same bits (tests/kernels/test_cpu_attention_rows.py). Reports ms per step (the 30
layers' calls; process CPU time at 1 thread, wall time at more) and the ratio to per-row AVX2. JSON to
benchmarks/results/bench_attention_verify.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

LAYERS, H, HKV, D = 30, 9, 3, 64
RESULTS = Path(__file__).resolve().parent / "results"
VARIANTS = {
    "per-row AVX2": {"SGL_CPU_ATTN_NO_GROUPS": "1", "SGL_CPU_ATTN_NO_ZMM": "1"},
    "per-row AVX-512": {"SGL_CPU_ATTN_NO_GROUPS": "1"},
    "grouped AVX2": {"SGL_CPU_ATTN_NO_ZMM": "1"},
    "grouped AVX-512": {},
}
LAYOUTS = ("contiguous", "scattered")


def child(contexts: list[int], draft: int, threads: int, reps: int) -> dict[str, float]:
    """ms per step for each (layout, context), in this process's build of the kernel: process CPU time with 1
    thread, wall time with more (the CPU time would count the helpers' spinning)."""
    import torch

    from sgl.kernels import cpu
    from sgl.kernels.cpu.attention import decode_attention

    torch.set_num_threads(threads)
    cpu.set_num_threads(threads)
    out = {}
    for layout in LAYOUTS:
        for ctx in contexts:
            n = ctx + draft + 1024  # pool slots: room for a scattered table
            gen = torch.Generator().manual_seed(ctx)
            table = (torch.randperm(n, generator=gen) if layout == "scattered" else torch.arange(n))[: ctx + draft + 1]
            rows = [table[: ctx + 1 + j] for j in range(draft + 1)]
            slots = torch.zeros(len(rows), ctx + draft + 1, dtype=torch.int64)
            for i, r in enumerate(rows):
                slots[i, : r.numel()] = r
            lens = torch.tensor([r.numel() for r in rows])
            q = torch.randn(len(rows), H, D, generator=gen)
            pools = [(torch.randn(n, HKV, D, generator=gen), torch.randn(n, HKV, D, generator=gen)) for _ in range(LAYERS)]
            clock = time.process_time if threads == 1 else time.perf_counter
            times = []
            for _ in range(reps + 1):
                t = clock()
                for k, v in pools:
                    decode_attention(q, k, v, slots, lens, D**-0.5, check=False)
                times.append((clock() - t) * 1e3)
            out[f"{layout}/{ctx}"] = statistics.median(times[1:])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--contexts", default="32,300,800")
    ap.add_argument("--draft", type=int, default=8, help="draft tokens: the step verifies 1 + draft rows")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    contexts = [int(c) for c in args.contexts.split(",")]
    if args.child:
        print(json.dumps(child(contexts, args.draft, args.threads, args.reps)))
        return
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in VARIANTS}
    loads = []
    for _ in range(args.rounds):
        for name, env in VARIANTS.items():
            loads.append(os.getloadavg()[0])
            r = subprocess.run([sys.executable, __file__, "--child", "--contexts", args.contexts, "--draft",
                                str(args.draft), "--threads", str(args.threads), "--reps", str(args.reps)],
                               capture_output=True, text=True, env={**os.environ, **env}, check=True)
            runs[name].append(json.loads(r.stdout.strip().splitlines()[-1]))
    keys = list(runs["grouped AVX-512"][0])
    ms = {name: {k: statistics.median(run[k] for run in rs) for k in keys} for name, rs in runs.items()}
    base = ms["per-row AVX2"]
    load = f"{min(loads):.1f}-{max(loads):.1f}"
    print(f"verify attention: 1 + {args.draft} chain rows, {H}/{HKV} heads x {D}, {LAYERS} layers, fp32 KV, "
          f"{args.threads} thread(s), load {load}: ms per step ({'process CPU' if args.threads == 1 else 'wall'} time, "
          f"median of {args.rounds} rounds)")
    print(f"{'layout/context':<18}" + "".join(f"{name:>18}" for name in VARIANTS) + f"{'speed-up':>10}")
    for k in keys:
        print(f"{k:<18}" + "".join(f"{ms[name][k]:18.2f}" for name in VARIANTS)
              + f"{base[k] / ms['grouped AVX-512'][k]:9.2f}x")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / ("bench_attention_verify.json" if args.threads == 1 else f"bench_attention_verify_t{args.threads}.json")
    out.write_text(json.dumps({"threads": args.threads, "draft": args.draft, "layers": LAYERS, "heads": [H, HKV, D],
                               "load": load, "rounds": args.rounds, "ms_per_step": ms}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

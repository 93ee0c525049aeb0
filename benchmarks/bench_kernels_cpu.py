"""Microbenchmark of sgl.kernels.cpu on the default model's linear shapes, vs torch fp32 in the same run.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_kernels_cpu.py [--threads 1 2] [--quick]

Per shape (in K -> out N; SmolLM2-135M: Q4_1 layers, Q8_0 tied lm_head) and M rows: torch
F.linear on the fp32 dequantized weight, our kernel with fp32, q16 (the default) and q8 activations;
median wall time, weight GB/s (quantized bytes for ours, fp32 bytes for torch) and torch/ours ratio.
Also the per-token matmul time at M = 1 (30 x the four layer shapes + lm_head) and the crossover of
the fused kernel vs the dequantize-tile + MKL prefill path. JSON to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from sgl.kernels import cpu  # noqa: E402
from sgl.kernels.cpu import quant  # noqa: E402

LAYERS = 30
SHAPES = [("qkv", 576, 960, "q4_1"), ("o", 576, 576, "q4_1"), ("gate_up", 576, 3072, "q4_1"),
          ("down", 1536, 576, "q4_1"), ("lm_head", 576, 49152, "q8_0")]
RESULTS = Path(__file__).resolve().parent / "results"


def timeit(fn, budget: float) -> float:
    """Median seconds per call over >= 5 calls within ~budget seconds (after 2 warm-up calls)."""
    fn()
    fn()
    times: list[float] = []
    t_end = time.perf_counter() + budget
    while len(times) < 5 or (time.perf_counter() < t_end and len(times) < 200):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run(threads: int, ms: list[int], budget: float) -> list[dict]:
    torch.set_num_threads(threads)
    cpu.set_num_threads(threads)
    rows = []
    gen = torch.Generator().manual_seed(0)
    for name, k, n, qtype in SHAPES:
        w = cpu.QuantWeight.quantize(torch.randn(n, k, generator=gen) * 0.05, qtype)
        wf = w.dequantize()
        for m in ms:
            x = torch.randn(m, k, generator=gen)
            out = torch.empty(m, n)
            t_torch = timeit(lambda: F.linear(x, wf), budget)
            t_fp32 = timeit(lambda: cpu.quant_linear(x, w, out=out, act_quant="none"), budget)
            t_q16 = timeit(lambda: cpu.quant_linear(x, w, out=out, act_quant="q16"), budget)
            t_q8 = timeit(lambda: cpu.quant_linear(x, w, out=out, act_quant="q8"), budget)
            row = {"threads": threads, "shape": name, "K": k, "N": n, "qtype": qtype, "M": m,
                   "torch_fp32_ms": t_torch * 1e3, "ours_fp32act_ms": t_fp32 * 1e3, "ours_q16act_ms": t_q16 * 1e3,
                   "ours_q8act_ms": t_q8 * 1e3, "ours_q16act_GBps": w.nbytes() / t_q16 / 1e9, "ratio_q16act": t_torch / t_q16,
                   "torch_GBps": wf.numel() * 4 / t_torch / 1e9, "ours_fp32act_GBps": w.nbytes() / t_fp32 / 1e9,
                   "ours_q8act_GBps": w.nbytes() / t_q8 / 1e9,
                   "ratio_fp32act": t_torch / t_fp32, "ratio_q8act": t_torch / t_q8}
            rows.append(row)
            print(f"{threads}T {name:8s} {qtype} M={m:4d}  torch {row['torch_fp32_ms']:8.3f} ms "
                  f"({row['torch_GBps']:5.1f} GB/s)  fp32-act {row['ours_fp32act_ms']:8.3f} ms "
                  f"({row['ours_fp32act_GBps']:5.1f} GB/s, x{row['ratio_fp32act']:.2f})  q16-act "
                  f"{row['ours_q16act_ms']:8.3f} ms ({row['ours_q16act_GBps']:5.1f} GB/s, x{row['ratio_q16act']:.2f})  q8-act "
                  f"{row['ours_q8act_ms']:8.3f} ms ({row['ours_q8act_GBps']:5.1f} GB/s, x{row['ratio_q8act']:.2f})",
                  flush=True)
    return rows


def crossover(threads: int, budget: float) -> list[dict]:
    """Fused kernel vs dequantize-tile + MKL at growing M on the gate_up shape (fp32 activations)."""
    torch.set_num_threads(threads)
    cpu.set_num_threads(threads)
    w = cpu.QuantWeight.quantize(torch.randn(3072, 576) * 0.05, "q4_1")
    rows, saved = [], quant.PREFILL_M
    try:
        for m in (16, 32, 48, 64, 96, 128, 256):
            x = torch.randn(m, 576)
            quant.PREFILL_M = 1 << 30
            fused = timeit(lambda: cpu.quant_linear(x, w), budget)
            quant.PREFILL_M = 1
            tiled = timeit(lambda: cpu.quant_linear(x, w), budget)
            rows.append({"threads": threads, "M": m, "fused_ms": fused * 1e3, "mkl_tiles_ms": tiled * 1e3})
            print(f"{threads}T crossover M={m:4d} fused {fused * 1e3:7.3f} ms  dequant+MKL {tiled * 1e3:7.3f} ms",
                  flush=True)
    finally:
        quant.PREFILL_M = saved
    return rows


def small_m(threads: int, budget: float) -> list[dict]:
    """The q16 small-M GEMM (each row the same bits as M = 1) vs the fp32-activation small-M path, per shape
    and M in 1..64, both in this run; `x_m1` = the q16 time / its M = 1 time (weight-stream-bound: ~1)."""
    torch.set_num_threads(threads)
    cpu.set_num_threads(threads)
    rows = []
    gen = torch.Generator().manual_seed(1)
    for name, k, n, qtype in SHAPES:
        w = cpu.QuantWeight.quantize(torch.randn(n, k, generator=gen) * 0.05, qtype)
        t1 = None
        for m in (1, 2, 4, 8, 16, 32, 64):
            x = torch.randn(m, k, generator=gen)
            out = torch.empty(m, n)
            t_fp32 = timeit(lambda: cpu.quant_linear(x, w, out=out, act_quant="none"), budget)
            t_q16 = timeit(lambda: cpu.quant_linear(x, w, out=out, act_quant="q16"), budget)
            t1 = t1 or t_q16
            row = {"threads": threads, "shape": name, "K": k, "N": n, "qtype": qtype, "M": m,
                   "fp32act_ms": t_fp32 * 1e3, "q16act_ms": t_q16 * 1e3, "q16_vs_fp32": t_fp32 / t_q16,
                   "q16_x_m1": t_q16 / t1}
            rows.append(row)
            print(f"{threads}T small-M {name:8s} M={m:3d}  fp32-act {t_fp32 * 1e3:8.3f} ms  q16 {t_q16 * 1e3:8.3f} ms"
                  f"  fp32/q16 x{row['q16_vs_fp32']:.2f}  q16 / its M=1 x{row['q16_x_m1']:.2f}", flush=True)
    return rows


def per_token(rows: list[dict], threads: int, key: str) -> float:
    by = {r["shape"]: r[key] for r in rows if r["threads"] == threads and r["M"] == 1}
    return sum(by[s] for s in ("qkv", "o", "gate_up", "down")) * LAYERS + by["lm_head"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--quick", action="store_true", help="M in {1, 8}, short budgets")
    ap.add_argument("--small-m", action="store_true",
                    help="only the q16 small-M GEMM vs the fp32 small-M path, M = 1..64 (-> bench_kernels_cpu_small_m.json)")
    args = ap.parse_args()
    if not cpu.extension_available():
        raise SystemExit("the C++ extension is not built: python -m sgl.kernels.cpu.build")
    if args.small_m:
        small = [r for t in args.threads for r in small_m(t, 0.3)]
        print("\n| threads | shape | M | fp32-act ms | q16 ms | fp32 / q16 | q16 / q16 at M=1 |")
        print("|---|---|---|---|---|---|---|")
        for r in small:
            print(f"| {r['threads']} | {r['shape']} {r['K']}x{r['N']} {r['qtype']} | {r['M']} | {r['fp32act_ms']:.3f} | "
                  f"{r['q16act_ms']:.3f} | {r['q16_vs_fp32']:.2f} | {r['q16_x_m1']:.2f} |")
        steps = {}  # a decode step's matmuls: 30 x (qkv + o + gate_up + down) + lm_head, per thread count and M
        for r in small:
            st = steps.setdefault(f"{r['threads']}T M={r['M']}", {"fp32act_ms": 0.0, "q16act_ms": 0.0})
            n = 1 if r["shape"] == "lm_head" else LAYERS
            st["fp32act_ms"] += n * r["fp32act_ms"]
            st["q16act_ms"] += n * r["q16act_ms"]
        for k, v in steps.items():
            print(f"| {k.split()[0][:-1]} | per decode step (30 layers + lm_head) | {k.split('=')[1]} | "
                  f"{v['fp32act_ms']:.2f} | {v['q16act_ms']:.2f} | {v['fp32act_ms'] / v['q16act_ms']:.2f} | |")
        RESULTS.mkdir(exist_ok=True)
        info = {"isa": cpu._ext.load().isa(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
                "loadavg": os.getloadavg()}
        (RESULTS / "bench_kernels_cpu_small_m.json").write_text(
            json.dumps({"info": info, "rows": small, "per_step_ms": steps}, indent=1) + "\n")
        return
    ms = [1, 8] if args.quick else [1, 8, 32, 64, 512]
    budget = 0.1 if args.quick else 0.4
    rows, cross, tokens = [], [], {}
    for t in args.threads:
        rows += run(t, ms, budget)
        if not args.quick:
            cross += crossover(t, budget)
        tokens[t] = {k: per_token(rows, t, k) for k in ("torch_fp32_ms", "ours_fp32act_ms", "ours_q16act_ms",
                                                         "ours_q8act_ms")}
        print(f"{t}T per-token matmul time at M=1 (30 layers + lm_head): " +
              ", ".join(f"{k} {v:.2f} ms" for k, v in tokens[t].items()), flush=True)
    print("\n| threads | shape | M | torch fp32 ms | fp32-act ms (GB/s) | x | q16-act ms (GB/s) | x | q8-act ms (GB/s) | x |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['threads']} | {r['shape']} {r['K']}x{r['N']} {r['qtype']} | {r['M']} | "
              f"{r['torch_fp32_ms']:.3f} | {r['ours_fp32act_ms']:.3f} ({r['ours_fp32act_GBps']:.1f}) | "
              f"{r['ratio_fp32act']:.2f} | {r['ours_q16act_ms']:.3f} ({r['ours_q16act_GBps']:.1f}) | "
              f"{r['ratio_q16act']:.2f} | {r['ours_q8act_ms']:.3f} ({r['ours_q8act_GBps']:.1f}) | "
              f"{r['ratio_q8act']:.2f} |")
    for t, v in tokens.items():
        print(f"| {t} | per token (30 layers + lm_head) | 1 | {v['torch_fp32_ms']:.2f} | "
              f"{v['ours_fp32act_ms']:.2f} | {v['torch_fp32_ms'] / v['ours_fp32act_ms']:.2f} | "
              f"{v['ours_q16act_ms']:.2f} | {v['torch_fp32_ms'] / v['ours_q16act_ms']:.2f} | "
              f"{v['ours_q8act_ms']:.2f} | {v['torch_fp32_ms'] / v['ours_q8act_ms']:.2f} |")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / ("bench_kernels_cpu_quick.json" if args.quick else "bench_kernels_cpu.json")
    info = {"isa": cpu._ext.load().isa(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
            "loadavg": os.getloadavg(), "prefill_m": quant.PREFILL_M}
    out.write_text(json.dumps({"info": info, "rows": rows, "crossover": cross, "per_token_ms": tokens},
                              indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

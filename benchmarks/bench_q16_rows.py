"""The batch-invariant small-M GEMM's cost per extra row (what a speculative verify row of 1 + j tokens pays),
q16 and q8 activations in the same run, 1 thread.

    OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_q16_rows.py [--act q16 q8] [--threads 1] [--tag NAME]

Per activation mode (q16: int16 x, vpmaddwd/vpdpwssd; q8: int8 x, vpdpbusd; both give every row the bits of
M = 1), per shape of the default model (K -> N; Q4_1 layers, the Q8_0 tied lm_head) and M in 1, 2, 4, 8, 9, 16:
the 10th-percentile CPU ms per call (thread CPU time: the calling thread runs the kernel at 1 thread), GMAC/s,
and the cost of an extra row as a fraction of the M = 1 call ((t_M - t_1) / ((M - 1) t_1)). The modes alternate
per (shape, M), so load drifts hit both. The per-step table sums 30 layers + lm_head, with each mode's ratios
to q16's M = 1 step. JSON to benchmarks/results/bench_q16_rows[_TAG].json.
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

from sgl.kernels import cpu  # noqa: E402

RESULTS = Path(__file__).parent / "results"
LAYERS = 30
SHAPES = [("qkv", 576, 960, "q4_1"), ("o", 576, 576, "q4_1"), ("gate_up", 576, 3072, "q4_1"),
          ("down", 1536, 576, "q4_1"), ("lm_head", 576, 49152, "q8_0")]
MS = (1, 2, 4, 8, 9, 16)


def timeit(fn, budget: float) -> float:
    for _ in range(3):
        fn()
    times = []
    t_end = time.perf_counter() + budget
    while len(times) < 7 or (time.perf_counter() < t_end and len(times) < 400):
        t0 = time.thread_time()
        fn()
        times.append(time.thread_time() - t0)
    return statistics.quantiles(times, n=10)[0]  # the 10th percentile of CPU time: the machine is shared


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--budget", type=float, default=0.5, help="seconds per (shape, M)")
    ap.add_argument("--tag", default="")
    ap.add_argument("--act", nargs="+", default=["q16", "q8"], choices=["q16", "q8"], help="activation modes")
    args = ap.parse_args()
    if not cpu.extension_available():
        raise SystemExit("the C++ extension is not built: python -m sgl.kernels.cpu.build")
    torch.set_num_threads(args.threads)
    cpu.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    rows = []
    load0 = os.getloadavg()
    for name, k, n, qtype in SHAPES:
        w = cpu.QuantWeight.quantize(torch.randn(n, k, generator=gen) * 0.05, qtype)
        t1: dict[str, float] = {}
        for m in MS:
            x = torch.randn(m, k, generator=gen)
            out = torch.empty(m, n)
            for act in args.act:
                t = timeit(lambda: cpu.quant_linear(x, w, out=out, act_quant=act), args.budget)
                t1.setdefault(act, t)
                extra = (t - t1[act]) / ((m - 1) * t1[act]) if m > 1 else 0.0
                rows.append({"act": act, "shape": name, "K": k, "N": n, "qtype": qtype, "M": m, "ms": t * 1e3,
                             "gmacs": m * n * k / t / 1e9, "extra_row_vs_m1": extra})
                print(f"{act:3s} {name:8s} {k:5d}x{n:<6d} {qtype} M={m:2d} {t * 1e3:8.3f} ms "
                      f"{m * n * k / t / 1e9:6.1f} GMAC/s extra row {extra:.3f} x M=1", flush=True)
    steps: dict[str, dict[int, float]] = {act: {} for act in args.act}
    for r in rows:
        s = steps[r["act"]]
        s[r["M"]] = s.get(r["M"], 0.0) + r["ms"] * (1 if r["shape"] == "lm_head" else LAYERS)
    base = steps[args.act[0]][1]
    print(f"\nmatmul ms per step (30 layers + lm_head), {args.threads} thread(s), load {load0[0]:.2f} -> "
          f"{os.getloadavg()[0]:.2f}; ratios to {args.act[0]}'s M = 1 step")
    print("\n| act | M | ms per step | x M=1 of its mode | x M=1 of " + args.act[0] + " | extra row x M=1 of its mode |")
    print("|---|---|---|---|---|---|")
    for act, s in steps.items():
        for m, v in s.items():
            print(f"| {act} | {m} | {v:.2f} | {v / s[1]:.2f} | {v / base:.2f} | {(v - s[1]) / max(m - 1, 1) / s[1]:.3f} |")
    info = {"threads": args.threads, "isa": cpu._ext.load().isa(), "loadavg_start": load0,
            "loadavg_end": os.getloadavg(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}
    RESULTS.mkdir(exist_ok=True)
    name = "bench_q16_rows" + (f"_{args.tag}" if args.tag else "") + ".json"
    (RESULTS / name).write_text(json.dumps({"info": info, "rows": rows, "per_step_ms": steps}, indent=1) + "\n")


if __name__ == "__main__":
    main()

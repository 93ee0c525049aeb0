"""The batch-invariant small-M GEMM's cost per extra row (what a speculative verify row of 1 + j tokens pays),
q16 and q8 activations in the same run, 1 thread.

    OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_q16_rows.py [--act q16 q8] [--threads 1] [--tag NAME]

Per activation mode (q16: int16 x, vpmaddwd/vpdpwssd; q8: int8 x, vpdpbusd; both give every row the bits of
M = 1), per shape of the default model (K -> N; Q4_1 layers, the Q8_0 tied lm_head) and M in 1, 2, 4, 8, 9, 16:
the 10th-percentile CPU ms per call (thread CPU time: the calling thread runs the kernel at 1 thread), GMAC/s,
and the cost of an extra row as a fraction of the M = 1 call ((t_M - t_1) / ((M - 1) t_1)). The modes alternate
per (shape, M), so load drifts hit both. The per-step table sums 30 layers + lm_head, with each mode's ratios
to q16's M = 1 step. JSON to benchmarks/results/bench_q16_rows[_TAG].json.

    OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_q16_rows.py --stack [--act q16 q8]
        [--stack-rows 1 2 9 16] [--reps 30] [--baseline-so OLD.so] [--context 300] [--tag NAME]

--stack: the whole fused stack instead (decode_rows: 30 random layers of the default model's shapes, Q4_1, fp16 KV),
M rows of one sequence's verify chain over a 300-slot context (--context), at 1 and 2 threads alternating per rep:
WALL ms per call (min and median over reps; at 2 threads the wall time is what a verify row costs), process CPU ms,
and the 2-thread speed-up. --baseline-so: another build of the extension (e.g. main's, built in a temp copy)
loaded beside this one, the two alternating per rep, bits compared. Before each (mode, M) it waits up to
--quiet-wait s for a second in which other processes use < 0.15 cores, and reports their mean use ("other
CPU") while it ran: 2-thread figures are only worth something on an idle second core. JSON to
benchmarks/results/bench_q16_rows_stack[_TAG].json.
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


def busy_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs since boot (/proc/stat)."""
    f = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return sum(f) - f[3] - f[4], sum(f)


class OtherCpu:
    """Cores used by OTHER processes over an interval: the machine's busy time minus this process's CPU time."""

    def __init__(self) -> None:
        self.b0, self.c0 = busy_jiffies(), time.process_time()

    def cores(self) -> float:
        b1 = busy_jiffies()
        hz, ncpu = os.sysconf("SC_CLK_TCK"), os.cpu_count() or 1
        wall = (b1[1] - self.b0[1]) / hz / ncpu
        return ((b1[0] - self.b0[0]) / hz - (time.process_time() - self.c0)) / max(wall, 1e-9)


def wait_quiet(limit: float) -> float:
    """Waits (up to `limit` s) for a second in which other processes use < 0.15 cores; returns the seconds waited."""
    t0 = time.time()
    while time.time() - t0 < limit:
        probe = OtherCpu()
        time.sleep(1.0)
        if probe.cores() < 0.15:
            break
    return time.time() - t0


def load_extension(path: str, name: str):
    """Another build of the extension as its own module (its own thread pool), beside sgl's."""
    import importlib.machinery
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, path,
                                                  loader=importlib.machinery.ExtensionFileLoader(name, path))
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def stack_bench(args: argparse.Namespace) -> None:
    """--stack (module docstring)."""
    from sgl.kernels.cpu import _ext
    from sgl.kernels.cpu.decode_layer import DecodeLayerWeights, DecodeStack, kv_half
    from sgl.runtime.models.rotary import RotaryEmbedding

    hid, heads, kv_heads, hd, inter, ctx = 576, 9, 3, 64, 1536, args.context
    slots = max(2048, ctx + max(args.stack_rows) + 64)
    gen = torch.Generator().manual_seed(0)

    def q(n: int, k: int) -> cpu.QuantWeight:
        w = cpu.QuantWeight.quantize(torch.randn(n, k, generator=gen) * k**-0.5, "q4_1")
        w.pack("q8")  # the q8 kernels read the packed copy, as the engine's weights (native_weights.py) do
        return w

    layers = tuple(DecodeLayerWeights(
        input_layernorm=1 + 0.1 * torch.randn(hid, generator=gen), post_attention_layernorm=1 + 0.1 * torch.randn(
            hid, generator=gen), eps=1e-5, qkv=q((heads + 2 * kv_heads) * hd, hid), qkv_bias=None,
        o=q(hid, heads * hd), o_bias=None, gate_up=q(2 * inter, hid), down=q(hid, inter), num_heads=heads,
        num_kv_heads=kv_heads, head_dim=hd) for _ in range(LAYERS))
    stack = DecodeStack(layers, tuple(torch.randn(slots, kv_heads, hd, generator=gen).half() for _ in layers),
                        tuple(torch.randn(slots, kv_heads, hd, generator=gen).half() for _ in layers))
    rope = RotaryEmbedding(hd, 10000.0, None, 4096)
    table = torch.randperm(slots, generator=gen)[: ctx + max(args.stack_rows)].contiguous()
    builds = {"this": _ext.load()}
    if args.baseline_so:
        builds = {"baseline": load_extension(args.baseline_so, "sgl_bench_baseline._sgl_cpu_quant"), **builds}
    threads = (1, 2)
    rows, load0 = [], os.getloadavg()
    for act in args.act:
        code = {"q8": 1, "q16": 2}[act]
        for m in args.stack_rows:
            lists = [table[: ctx + 1 + j].contiguous() for j in range(m)]  # verify row j sees rows < j
            addrs = torch.tensor([t.data_ptr() for t in lists], dtype=torch.int64)
            lens = torch.tensor([t.numel() for t in lists], dtype=torch.int64)
            pos = torch.arange(ctx, ctx + m)
            cos, sin = rope.cos[pos].contiguous(), rope.sin_signed[pos].contiguous()
            h0 = torch.randn(m, hid, generator=gen)
            waited = wait_quiet(args.quiet_wait)
            other = OtherCpu()
            wall: dict[tuple[str, int], list[float]] = {(b, t): [] for b in builds for t in threads}
            cpu_s: dict[tuple[str, int], list[float]] = {k: [] for k in wall}
            outs = []
            for t in threads:  # a thread count's calls back to back (its pool's helpers spin between them)
                for rep in range(args.reps + 1):  # rep 0 warms up
                    for b, ext in builds.items():
                        h = h0.clone()
                        t0, c0 = time.perf_counter(), time.process_time()
                        ext.decode_rows(h.data_ptr(), m, stack.table.data_ptr(), LAYERS, 1e-5, hid, heads, kv_heads,
                                        hd, inter, cos.data_ptr(), sin.data_ptr(), addrs.data_ptr(), lens.data_ptr(),
                                        slots, hd**-0.5, kv_half(stack.k_bufs[0]), t, code)
                        if rep:
                            wall[b, t].append(time.perf_counter() - t0)
                            cpu_s[b, t].append(time.process_time() - c0)
                        else:
                            outs.append(h)
            if not all(torch.equal(outs[0], o) for o in outs[1:]):
                raise SystemExit(f"{act} M={m}: the builds / thread counts disagree in the bits")
            oc = other.cores()
            for (b, t), ws in wall.items():
                r = {"act": act, "M": m, "build": b, "threads": t, "wall_ms_min": 1e3 * min(ws),
                     "wall_ms_median": 1e3 * statistics.median(ws), "cpu_ms_min": 1e3 * min(cpu_s[b, t]),
                     "other_cpu_cores": oc, "waited_s": waited}
                rows.append(r)
            for b in builds:
                one, two = (next(r for r in rows if r["act"] == act and r["M"] == m and r["build"] == b
                                 and r["threads"] == t) for t in threads)
                print(f"{act} M={m:2d} {b:8s} wall 1t {one['wall_ms_min']:7.2f} (med {one['wall_ms_median']:7.2f}) "
                      f"2t {two['wall_ms_min']:7.2f} (med {two['wall_ms_median']:7.2f}) speed-up "
                      f"{one['wall_ms_min'] / two['wall_ms_min']:.2f}x; CPU 2t {two['cpu_ms_min']:.2f} ms; "
                      f"other CPU {oc:.2f} cores", flush=True)
    print(f"\nwall ms per call (min over {args.reps} reps), load {load0[0]:.2f} -> {os.getloadavg()[0]:.2f}")
    print("\n| act | M | build | 1 thread | 2 threads | speed-up | other CPU (cores) |\n|---|---|---|---|---|---|---|")
    for r1 in (r for r in rows if r["threads"] == 1):
        r2 = next(r for r in rows if r["threads"] == 2 and all(r[k] == r1[k] for k in ("act", "M", "build")))
        print(f"| {r1['act']} | {r1['M']} | {r1['build']} | {r1['wall_ms_min']:.2f} | {r2['wall_ms_min']:.2f} | "
              f"{r1['wall_ms_min'] / r2['wall_ms_min']:.2f}x | {r1['other_cpu_cores']:.2f} |")
    info = {"isa": _ext.load().isa(), "loadavg_start": load0, "loadavg_end": os.getloadavg(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "baseline_so": args.baseline_so,
            "context": ctx, "layers": LAYERS}
    RESULTS.mkdir(exist_ok=True)
    name = "bench_q16_rows_stack" + (f"_{args.tag}" if args.tag else "") + ".json"
    (RESULTS / name).write_text(json.dumps({"info": info, "rows": rows}, indent=1) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stack", action="store_true", help="the fused stack (decode_rows) at 1 and 2 threads")
    ap.add_argument("--stack-rows", type=int, nargs="+", default=[1, 2, 9, 16], help="--stack: row counts")
    ap.add_argument("--reps", type=int, default=30, help="--stack: timed calls per (build, threads)")
    ap.add_argument("--baseline-so", default="", help="--stack: another build's .so to compare with")
    ap.add_argument("--context", type=int, default=300, help="--stack: the slots every row attends to before its own")
    ap.add_argument("--quiet-wait", type=float, default=60.0, help="--stack: seconds to wait for an idle machine")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--budget", type=float, default=0.5, help="seconds per (shape, M)")
    ap.add_argument("--tag", default="")
    ap.add_argument("--act", nargs="+", default=["q16", "q8"], choices=["q16", "q8"], help="activation modes")
    args = ap.parse_args()
    if not cpu.extension_available():
        raise SystemExit("the C++ extension is not built: python -m sgl.kernels.cpu.build")
    if args.stack:
        stack_bench(args)
        return
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

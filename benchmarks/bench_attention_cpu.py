"""Batch decode attention over the paged KV pool (sgl.kernels.cpu.decode_attention), vs torch in the same run.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_attention_cpu.py [--threads 1] [--batch 32] [--ctx 91]

The default model's attention shape (9 query heads, 3 kv heads, head_dim 64) over 30 layers, each with its
own pool, `--batch` rows of about `--ctx` slots each (row b: ctx - batch / 2 + b). Slot layouts:
- interleaved: a 20-token prompt in consecutive slots, then decode tokens `batch` slots apart (page size 1
  with every row decoding: what a continuous batch's pool looks like);
- contiguous: each row's slots consecutive (one request alone, or a fresh prefill);
- cached: every row reads the same slots of one small pool (all in L1/L2: the kernel's compute floor).
Reports ms per decode step (the 30 layers' calls, process CPU time, median of --reps) and the torch
reference (sgl.kernels.cpu.attention.decode_attention_reference: gather + SDPA) for the interleaved layout
as the baseline ratio. JSON to benchmarks/results/bench_attention_cpu.json.
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

from sgl.kernels.cpu.attention import decode_attention, decode_attention_reference  # noqa: E402

LAYERS, H, HKV, D = 30, 9, 3, 64
RESULTS = Path(__file__).resolve().parent / "results"


def layouts(batch: int, ctx: int) -> dict[str, tuple[torch.Tensor, torch.Tensor, int]]:
    """name -> (slots [B, Lmax], lens [B], pool slots)."""
    lens = torch.tensor([max(21, ctx - batch // 2 + b) for b in range(batch)])
    L, prompt = int(lens.max()), 20
    inter = [[b * prompt + i for i in range(prompt)] + [batch * prompt + b + batch * j for j in range(L - prompt)]
             for b in range(batch)]
    contig = [[b * L + i for i in range(L)] for b in range(batch)]
    return {"interleaved": (torch.tensor(inter), lens, batch * L + batch * prompt),
            "contiguous": (torch.tensor(contig), lens, batch * L),
            "cached": (torch.arange(L).repeat(batch, 1), lens, L)}


def step_ms(fn, pools: list[tuple[torch.Tensor, torch.Tensor]], reps: int) -> float:
    """Median process-CPU ms of one step (one call per layer, each on its own pool)."""
    times = []
    for _ in range(reps + 1):
        t = time.process_time()
        for k, v in pools:
            fn(k, v)
        times.append((time.process_time() - t) * 1e3)
    return statistics.median(times[1:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--ctx", type=int, default=91)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    q = torch.randn(args.batch, H, D)
    rows = {}
    for name, (slots, lens, n) in layouts(args.batch, args.ctx).items():
        pools = [(torch.randn(n, HKV, D), torch.randn(n, HKV, D)) for _ in range(1 if name == "cached" else LAYERS)]
        pools = pools * (LAYERS // len(pools))
        rows[name] = step_ms(lambda k, v: decode_attention(q, k, v, slots, lens, D ** -0.5), pools, args.reps)
        if name == "interleaved":
            base = step_ms(lambda k, v: decode_attention_reference(q, k, v, slots, lens, D ** -0.5), pools,
                           max(1, args.reps // 2))
    load = os.getloadavg()[0]
    print(f"decode attention, {args.batch} rows x ~{args.ctx} slots, {LAYERS} layers, {args.threads} thread(s), "
          f"load {load:.1f}: ms per step (process CPU time)")
    print(f"{'layout':<12} {'ours ms':>9} {'torch ref ms':>13} {'ratio':>7}")
    for name, ms in rows.items():
        ref = base if name == "interleaved" else None
        print(f"{name:<12} {ms:9.2f} {ref if ref is not None else float('nan'):13.2f} "
              f"{(ref / ms if ref is not None else float('nan')):7.2f}")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "bench_attention_cpu.json"
    out.write_text(json.dumps({"threads": args.threads, "batch": args.batch, "ctx": args.ctx, "load": load,
                               "ours_ms_per_step": rows, "torch_reference_interleaved_ms": base}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

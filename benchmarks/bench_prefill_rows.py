"""Short prompts: the prefill path vs decode rows (runtime/models/fused_decode.py SHORT_STEP_ROWS), default model.

    OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_prefill_rows.py [--lengths 8 16 40 64 100 320] [--act q8]

Per prompt length L (random token ids): `model.forward` of the whole prompt in one step on the prefill path (fp32
activations; MKL on dequantized weights from 96 rows) vs the same tokens as decode rows (`decode_rows`, q16, in
calls of at most 64 rows), best of --reps, thread CPU time, both in this process, alternating. Prints a table of
ratios (> 1: rows faster) and writes benchmarks/results/bench_prefill_rows.json.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

import sgl.runtime.models.fused_decode as fused_decode  # noqa: E402
from sgl.kernels import cpu  # noqa: E402
from sgl.runtime.executor.forward_batch import ForwardBatch  # noqa: E402
from sgl.runtime.executor.kv_cache import KVCache  # noqa: E402
from sgl.runtime.models.loader import load_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def prefill_ms(model: object, kv: KVCache, ids: list[int], rows: bool, reps: int) -> float:
    """Best thread-CPU ms of prefilling `ids` (slots 0..L-1): one step, or decode-row steps of <= 64 tokens."""
    n = len(ids)
    table = torch.arange(n, dtype=torch.int64)
    saved = fused_decode.SHORT_STEP_ROWS
    fused_decode.SHORT_STEP_ROWS = fused_decode.MAX_ROWS if rows else 0
    try:
        best = float("inf")
        for _ in range(reps):
            t0 = time.thread_time()
            for s in range(0, n, fused_decode.MAX_ROWS if rows else n):
                e = min(n, s + (fused_decode.MAX_ROWS if rows else n))
                model.forward(ForwardBatch.from_lists([ids[s:e]], [table[:e]]), kv)
            best = min(best, time.thread_time() - t0)
        return best * 1e3
    finally:
        fused_decode.SHORT_STEP_ROWS = saved


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[8, 16, 40, 64, 100, 320])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--act", default="q16", choices=["q16", "q8"], help="the activation mode (--cpu-act-quant)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "bench_prefill_rows.json"))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    cpu.set_num_threads(a.threads)
    cpu.set_act_quant(a.act)
    lm = load_model("default", dtype="float32", device="cpu", show_progress=False, weight_format="native")
    kv = KVCache.for_model(lm.config, max(a.lengths) + 8, torch.float32, "cpu")
    g = torch.Generator().manual_seed(0)
    load = os.getloadavg()[0]
    table = []
    for n in a.lengths:
        ids = torch.randint(100, 40000, (n,), generator=g).tolist()
        prefill_ms(lm.model, kv, ids, True, 1)  # warm-up
        path, rows = prefill_ms(lm.model, kv, ids, False, a.reps), prefill_ms(lm.model, kv, ids, True, a.reps)
        table.append({"tokens": n, "prefill_path_ms": round(path, 1), "rows_ms": round(rows, 1),
                      "rows_speedup": round(path / rows, 2)})
        print(f"{n:5d} tokens: prefill path {path:7.1f} ms, decode rows {rows:7.1f} ms, {path / rows:.2f}x", flush=True)
    print(f"act {a.act}, threads {a.threads}, load {load:.1f} -> {os.getloadavg()[0]:.1f}")
    Path(a.out).write_text(json.dumps({"act": a.act, "threads": a.threads, "load": [load, os.getloadavg()[0]], "table": table},
                                      indent=1))


if __name__ == "__main__":
    main()

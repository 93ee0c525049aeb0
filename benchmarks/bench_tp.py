"""Tensor parallelism on one machine: tp=1 vs tp=2 decode and prefill throughput, same total threads.

    python benchmarks/bench_tp.py --num-threads 2 --repeats 3 --decode-tokens 64 --prefill-tokens 512

Each round builds an in-process `sgl.Engine(tp_size=1)` and `sgl.Engine(tp_size=2)` (the order
alternates between rounds) on the default model with `--num-threads` in total (tp=2: half per rank)
and measures, with the prefix cache flushed before each request:
  * decode tok/s: one greedy request of a short prompt, `--decode-tokens` new tokens (ignore_eos),
    completion_tokens / latency;
  * prefill tok/s: one prompt of `--prefill-tokens` tokens and max_new_tokens 1, prompt_tokens / latency.
The table gives medians over rounds and the ratio tp=2 / tp=1. Writes benchmarks/results/bench_tp.json.
NOTE: on a 2-core machine shared with other jobs, tp=2 pays ~2 all-reduces per layer whose latency is
the other rank's scheduling delay; the load average is in the output.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

RESULTS = Path(__file__).resolve().parent / "results"


def measure(tp: int, args: argparse.Namespace) -> dict[str, float]:
    from sgl.runtime.engine import Engine

    with Engine(model_path="default", tp_size=tp, num_threads=args.num_threads, max_total_tokens=8192,
                show_progress=False, log_level="warning", weight_format=args.weight_format) as eng:
        eng.generate("warm up", {"max_new_tokens": 4})
        eng.flush_cache()
        out = eng.generate("Write a story about a dragon.", {"max_new_tokens": args.decode_tokens, "temperature": 0,
                                                              "ignore_eos": True})
        decode = out["meta_info"]["completion_tokens"] / out["meta_info"]["e2e_latency"]
        eng.flush_cache()
        prompt = list(range(1000, 1000 + args.prefill_tokens))
        t0 = time.perf_counter()
        out = eng.generate(input_ids=prompt, sampling_params={"max_new_tokens": 1})
        prefill = out["meta_info"]["prompt_tokens"] / (time.perf_counter() - t0)
        return {"decode_tok_s": decode, "prefill_tok_s": prefill}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-threads", type=int, default=2, help="total over the ranks")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--prefill-tokens", type=int, default=512)
    ap.add_argument("--weight-format", default="auto", choices=["auto", "fp32", "native"])
    args = ap.parse_args()
    runs: dict[int, list[dict[str, float]]] = {1: [], 2: []}
    for r in range(args.repeats):
        for tp in ((1, 2) if r % 2 == 0 else (2, 1)):
            runs[tp].append(measure(tp, args))
            print(f"round {r} tp={tp}: {runs[tp][-1]}", flush=True)
    med = {tp: {k: statistics.median(x[k] for x in rs) for k in rs[0]} for tp, rs in runs.items()}
    load = os.getloadavg()
    out: dict[str, Any] = {"config": vars(args), "load_avg": load, "runs": runs, "median": med,
                           "ratio": {k: med[2][k] / med[1][k] for k in med[1]}}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "bench_tp.json").write_text(json.dumps(out, indent=2))
    print(f"\n| metric | tp=1 ({args.num_threads} threads) | tp=2 ({max(1, args.num_threads // 2)} thread(s) x 2) "
          f"| tp=2 / tp=1 |\n|---|---|---|---|")
    for k in med[1]:
        print(f"| {k} | {med[1][k]:.1f} | {med[2][k]:.1f} | {out['ratio'][k]:.2f}x |")
    print(f"load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")


if __name__ == "__main__":
    main()

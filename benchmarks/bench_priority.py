"""Realtime latency under a saturating batch load: fcfs vs weighted classes vs preemption (recompute,
swap), the cost of a swap round trip against recomputing the same context, and the hierarchical prefix
cache on a shared-prefix workload whose prefixes do not fit the KV pool.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_priority.py --num-threads 1

Shortened from issue 15's scenario so it runs in minutes on a shared 2-core machine (the flags scale it
back up): `--batch-requests` (16, the issue has 64) batch requests of ~`--batch-prompt` tokens and
`--batch-new` new tokens fill `--max-running` places; realtime requests (a short prompt, 8 new tokens)
arrive every `--realtime-interval` s (2 s = the issue's 0.5/s). One in-process Engine per configuration
(the same weights file, the same workload, run one after another):

  fcfs                  every request standard: realtime waits behind the queued batch work
  weighted              realtime/standard/batch classes, --priority-weights, no preemption
  preempt-recompute     + a realtime arrival preempts the newest batch request, which recomputes later
  preempt-swap          + the same, its KV copied to the host tier and back

Columns: realtime TTFT p50/p99 (streamed; timed by the client from submission), the ratio of p99
to fcfs's, batch throughput (batch output tokens / time until the last batch request ends) and its loss
vs fcfs, preemptions and swapped bytes. `--sections priority,crossover,hicache` picks the parts (all by
default). Writes benchmarks/results/bench_priority.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import threading
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"

CONFIGS: dict[str, dict[str, Any]] = {
    "fcfs": dict(classes=False, disable_latency_preemption=True),
    "weighted": dict(classes=True, disable_latency_preemption=True),
    "preempt-recompute": dict(classes=True, preemption_mode="recompute"),
    "preempt-swap": dict(classes=True, preemption_mode="swap"),
}


def percentile(values: list[float], q: float) -> float:
    v = sorted(values)
    return v[min(int(q * len(v)), len(v) - 1)]


def workload(args: argparse.Namespace, vocab: int) -> tuple[list[list[int]], list[list[int]]]:
    rng = random.Random(0)
    # NOTE: random token ids (not text): every batch prompt is distinct, so the prefix cache cannot help
    batch = [[rng.randrange(100, vocab - 100) for _ in range(args.batch_prompt)] for _ in range(args.batch_requests)]
    realtime = [[rng.randrange(100, vocab - 100) for _ in range(24)] for _ in range(args.realtime_requests)]
    return batch, realtime


def run_config(name: str, args: argparse.Namespace) -> dict[str, Any]:
    from sgl.runtime.engine import Engine

    cfg = dict(CONFIGS[name])
    classes = cfg.pop("classes")
    eng = Engine(model_path="default", num_threads=args.num_threads, max_total_tokens=args.max_total_tokens,
                 max_running_requests=args.max_running, show_progress=False, swap_space=0.5, **cfg)
    batch, realtime = workload(args, eng.model_config.vocab_size)
    eng.generate(input_ids=[1, 2, 3], sampling_params={"max_new_tokens": 2})  # warm-up
    bclass, rclass = ("batch", "realtime") if classes else ("standard", "standard")
    outs: dict[str, Any] = {}
    ttfts: dict[str, float] = {}
    batch_done: list[float] = []

    def submit(key: str, ids: list[int], new: int, cls: str) -> None:
        params = {"max_new_tokens": new, "temperature": 0, "ignore_eos": True}
        if key.startswith("b"):
            outs[key] = eng.generate(input_ids=ids, sampling_params=params, priority_class=cls)
            batch_done.append(time.monotonic())
            return
        # realtime: streamed, TTFT timed by the client from submission (queueing + the step in flight + prefill)
        start = time.monotonic()
        for out in eng.generate(input_ids=ids, sampling_params=params, priority_class=cls, stream=True):
            if key not in ttfts and out["meta_info"]["completion_tokens"] >= 1:
                ttfts[key] = time.monotonic() - start
            outs[key] = out

    t0 = time.monotonic()
    threads = [threading.Thread(target=submit, args=(f"b{i}", p, args.batch_new, bclass)) for i, p in enumerate(batch)]
    for t in threads:
        t.start()
    for i, p in enumerate(realtime):
        time.sleep(args.realtime_interval)
        t = threading.Thread(target=submit, args=(f"r{i}", p, 8, rclass))
        t.start()
        threads.append(t)
    for t in threads:
        t.join()
    stats = eng.get_stats()
    eng.check_integrity()
    eng.shutdown()
    ttft = [ttfts[f"r{i}"] for i in range(len(realtime))]
    batch_tokens = sum(outs[f"b{i}"]["meta_info"]["completion_tokens"] for i in range(len(batch)))
    return {"config": name, "realtime_ttft_p50_s": statistics.median(ttft), "realtime_ttft_p99_s": percentile(ttft, 0.99),
            "realtime_ttft_s": ttft, "batch_tok_per_s": batch_tokens / (max(batch_done) - t0),
            "batch_wall_s": max(batch_done) - t0, "num_preemptions_swap": stats["num_preemptions_swap"],
            "num_preemptions_recompute": stats["num_preemptions_recompute"], "swap_out_bytes": stats["swap_out_bytes"],
            "prefill_tokens_computed": stats["prefill_tokens_computed"]}


def swap_vs_recompute(args: argparse.Namespace, lengths: list[int]) -> list[dict[str, Any]]:
    """Per context length: a swap round trip (out + in) vs recomputing that context (a prefill)."""
    from sgl.runtime.engine import Engine
    from sgl.runtime.executor.kv_mover import HostKVMover

    eng = Engine(model_path="default", num_threads=args.num_threads, max_total_tokens=4096, show_progress=False,
                 disable_radix_cache=True, swap_space=0)
    kv = eng.scheduler.runner.kv
    mover = HostKVMover(kv, max(lengths))
    rng = random.Random(1)
    rows = []
    for n in lengths:
        ids = [rng.randrange(100, 40000) for _ in range(n)]
        prefill = []
        for _ in range(3):
            start = time.perf_counter()
            eng.generate(input_ids=ids, sampling_params={"max_new_tokens": 1})
            prefill.append(time.perf_counter() - start)
        slots = list(range(n))
        swap = []
        for _ in range(5):
            start = time.perf_counter()
            mover.swap_out(slots, slots)
            mover.swap_in(slots, slots)
            swap.append(time.perf_counter() - start)
        rows.append({"context_tokens": n, "swap_round_trip_ms": statistics.median(swap) * 1e3,
                     "recompute_ms": statistics.median(prefill) * 1e3,
                     "bytes": n * mover.bytes_per_slot})
    eng.shutdown()
    return rows


def hicache(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Shared-prefix workload with a KV pool too small for all prefixes: plain tree vs hierarchical."""
    from sgl.runtime.engine import Engine

    rng = random.Random(2)
    systems = [[rng.randrange(100, 40000) for _ in range(args.hicache_prefix)] for _ in range(args.hicache_prompts)]
    work = [systems[i % len(systems)] + [rng.randrange(100, 40000) for _ in range(16)]
            for i in range(len(systems) * args.hicache_rounds)]
    rows = []
    for hier in (False, True):
        eng = Engine(model_path="default", num_threads=args.num_threads, max_total_tokens=args.hicache_pool,
                     max_running_requests=2, hierarchical_cache=hier, host_cache_tokens=8 * args.hicache_pool,
                     show_progress=False)
        start = time.perf_counter()
        outs = [eng.generate(input_ids=ids, sampling_params={"max_new_tokens": 4, "temperature": 0}) for ids in work]
        took = time.perf_counter() - start
        stats = eng.get_stats()
        eng.check_integrity()
        eng.shutdown()
        rows.append({"hierarchical": hier, "prefill_tokens_computed": stats["prefill_tokens_computed"],
                     "promoted_tokens": stats["host_cache_promoted_tokens"], "wall_s": took,
                     "output_ids": [o["output_ids"] for o in outs]})
    assert rows[0]["output_ids"] == rows[1]["output_ids"], "the hierarchical cache changed greedy outputs"
    for r in rows:
        del r["output_ids"]
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-threads", type=int, default=1)
    ap.add_argument("--batch-requests", type=int, default=16)
    ap.add_argument("--batch-prompt", type=int, default=256)
    ap.add_argument("--batch-new", type=int, default=96)
    ap.add_argument("--max-running", type=int, default=8)
    ap.add_argument("--max-total-tokens", type=int, default=8192)
    ap.add_argument("--realtime-requests", type=int, default=8)
    ap.add_argument("--realtime-interval", type=float, default=2.0)
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--crossover", default="32,64,128,256,512,1024", help="context lengths for swap vs recompute")
    ap.add_argument("--hicache-prompts", type=int, default=8, help="distinct shared prefixes")
    ap.add_argument("--hicache-prefix", type=int, default=200, help="tokens per shared prefix")
    ap.add_argument("--hicache-rounds", type=int, default=4)
    ap.add_argument("--hicache-pool", type=int, default=800, help="KV pool slots (holds ~3 prefixes)")
    ap.add_argument("--sections", default="priority,crossover,hicache")
    ap.add_argument("--out", default=str(RESULTS / "bench_priority.json"))
    args = ap.parse_args()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    sections = set(args.sections.split(","))
    load = os.getloadavg()
    result: dict[str, Any] = {"threads": args.num_threads, "loadavg_before": load, "args": vars(args)}
    if "priority" in sections:
        result["runs"] = priority_table(args, load)
    if "crossover" in sections:
        result["swap_vs_recompute"] = crossover_table(args)
    if "hicache" in sections:
        rows = hicache(args)
        print(f"\nshared prefixes: {args.hicache_prompts} x {args.hicache_prefix} tokens, {args.hicache_rounds} rounds, "
              f"KV pool {args.hicache_pool}")
        print("| prefix cache | prefill tokens | promoted from host | wall |")
        print("|---|---|---|---|")
        for r in rows:
            print(f"| {'hierarchical' if r['hierarchical'] else 'device only'} | {r['prefill_tokens_computed']} | "
                  f"{r['promoted_tokens']} | {r['wall_s']:.1f} s |")
        print(f"prefill ratio: {rows[0]['prefill_tokens_computed'] / max(rows[1]['prefill_tokens_computed'], 1):.2f}x less")
        result["hicache"] = rows
    result["loadavg_after"] = os.getloadavg()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"\nwrote {args.out}  (load after={result['loadavg_after'][0]:.2f})")


def priority_table(args: argparse.Namespace, load: tuple[float, ...]) -> list[dict[str, Any]]:
    runs = [run_config(name, args) for name in args.configs.split(",")]
    base = next((r for r in runs if r["config"] == "fcfs"), runs[0])
    print(f"\nthreads={args.num_threads}  load before={load[0]:.2f}  batch {args.batch_requests} x "
          f"{args.batch_prompt}+{args.batch_new}, realtime {args.realtime_requests} every {args.realtime_interval} s, "
          f"max_running {args.max_running}")
    print("| config | realtime TTFT p50 | p99 | p99 vs fcfs | batch tok/s | batch vs fcfs | preemptions (swap/recompute) |")
    print("|---|---|---|---|---|---|---|")
    for r in runs:
        r["p99_vs_fcfs"] = r["realtime_ttft_p99_s"] / base["realtime_ttft_p99_s"]
        r["batch_vs_fcfs"] = r["batch_tok_per_s"] / base["batch_tok_per_s"]
        print(f"| {r['config']} | {r['realtime_ttft_p50_s']:.2f} s | {r['realtime_ttft_p99_s']:.2f} s | "
              f"{r['p99_vs_fcfs']:.2f}x | {r['batch_tok_per_s']:.1f} | {r['batch_vs_fcfs']:.2f}x | "
              f"{r['num_preemptions_swap']}/{r['num_preemptions_recompute']} |")
    return runs


def crossover_table(args: argparse.Namespace) -> list[dict[str, Any]]:
    cross = swap_vs_recompute(args, [int(x) for x in args.crossover.split(",") if x])
    print("\n| context tokens | KV bytes | swap out+in | recompute (prefill) | ratio |")
    print("|---|---|---|---|---|")
    for c in cross:
        print(f"| {c['context_tokens']} | {c['bytes'] / 1e6:.1f} MB | {c['swap_round_trip_ms']:.1f} ms | "
              f"{c['recompute_ms']:.0f} ms | {c['recompute_ms'] / c['swap_round_trip_ms']:.0f}x |")
    return cross


if __name__ == "__main__":
    main()

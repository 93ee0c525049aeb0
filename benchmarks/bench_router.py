"""Data parallelism: the shared-prefix workload on `sgl serve --dp-size 2`, cache_aware vs round_robin.

    python benchmarks/bench_router.py --num-threads 2 --system-prompts 8 --per-prompt 4 --concurrency 8

One `sgl serve --dp-size 2 --num-threads T` (T // 2 threads per replica, its router: cache_aware) and
one `sgl router --policy round_robin` over the same two replicas. Workload: `--system-prompts`
distinct long system prompts, `--per-prompt` short questions each, shuffled (seed 0; `--order
interleaved`: prompt i of round r),
`--concurrency` in flight, greedy, `--max-new-tokens`. Before each run every replica's cache is
flushed. Reported: prompt-token cache hit rate (sum cached_tokens / sum prompt_tokens), requests/s,
and the same workload on ONE replica directly (the hit-rate reference: a single server sees every
prefix). The policies alternate for `--repeats` rounds; the table gives medians and the ratio.
Writes benchmarks/results/bench_router.json.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from sgl.runtime.processes import free_port, stop_processes, wait_healthy

RESULTS = Path(__file__).resolve().parent / "results"
TOPICS = ["hotel bookings in Lisbon", "train tickets across Japan", "ski holidays in the Alps", "museum tours in Cairo",
          "diving trips in Belize", "wine tours in Mendoza", "food markets in Hanoi", "northern lights in Tromso",
          "road trips in Iceland", "safari lodges in Kenya", "temples of Kyoto", "islands of Greece"]


def system_prompt(i: int) -> str:
    topic = TOPICS[i % len(TOPICS)]
    rules = " ".join(f"Rule {k}: when a customer asks about {topic}, check the season, the budget, the group "
                     f"size and the travel dates before suggesting anything." for k in range(1, 9))
    return f"You are the agency's assistant for {topic} (desk {i}). {rules} Answer briefly.\n"


def run(url: str, workers: list[str], prompts: list[str], concurrency: int, max_new: int) -> dict[str, Any]:
    for w in workers:
        httpx.post(w + "/flush_cache", timeout=60).raise_for_status()

    def one(text: str) -> dict[str, Any]:
        r = httpx.post(url + "/generate", timeout=600, json={
            "text": text, "sampling_params": {"max_new_tokens": max_new, "temperature": 0, "ignore_eos": True}})
        r.raise_for_status()
        return r.json()["meta_info"]

    cpu0 = time.process_time()
    start = time.perf_counter()
    with cf.ThreadPoolExecutor(concurrency) as ex:
        metas = list(ex.map(one, prompts))
    wall = time.perf_counter() - start
    prompt_tokens = sum(m["prompt_tokens"] for m in metas)
    cached = sum(m["cached_tokens"] for m in metas)
    return {"wall_s": wall, "req_per_s": len(prompts) / wall, "hit_rate": cached / prompt_tokens,
            "prompt_tokens": prompt_tokens, "cached_tokens": cached, "client_cpu_s": time.process_time() - cpu0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-threads", type=int, default=2, help="total; each of the 2 replicas gets half")
    ap.add_argument("--system-prompts", type=int, default=8)
    ap.add_argument("--per-prompt", type=int, default=4)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--order", choices=("shuffled", "interleaved"), default="shuffled")
    ap.add_argument("--balance-threshold", type=int, default=None,
                    help="the cache_aware router's --router-balance-threshold (default: the server's)")
    args = ap.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, args.num_threads // 2)), "OMP_WAIT_POLICY": "PASSIVE"}
    port = free_port()
    dp = subprocess.Popen([sys.executable, "-m", "sgl.launch_server", "--model-path", "default", "--dp-size", "2",
                           "--num-threads", str(args.num_threads), "--port", str(port), "--max-total-tokens", "32768",
                           "--log-level", "warning"]
                          + (["--router-balance-threshold", str(args.balance_threshold)]
                             if args.balance_threshold is not None else []), env=env, stdin=subprocess.DEVNULL)
    procs = [dp]
    try:
        cache_url = f"http://127.0.0.1:{port}"
        wait_healthy(cache_url, dp)
        workers = [w["url"] for w in httpx.get(cache_url + "/server_info", timeout=30).json()["router"]["workers"]]
        rport = free_port()
        rr = subprocess.Popen([sys.executable, "-m", "sgl.cli", "router", "--worker-urls", *workers, "--policy",
                               "round_robin", "--port", str(rport), "--log-level", "warning"], env=env,
                              stdin=subprocess.DEVNULL)
        procs.append(rr)
        rr_url = f"http://127.0.0.1:{rport}"
        wait_healthy(rr_url, rr)
        prompts = [system_prompt(i) + f"Question {r}: what should I pack?"
                   for r in range(args.per_prompt) for i in range(args.system_prompts)]
        if args.order == "shuffled":  # interleaved + an even prompt count pins each prompt to one round_robin worker
            random.Random(0).shuffle(prompts)
        run(cache_url, workers, prompts[:2], 2, 1)  # warm-up
        rows: dict[str, list[dict[str, Any]]] = {"cache_aware": [], "round_robin": [], "single_server": []}
        for rep in range(args.repeats):
            for name, url in (("cache_aware", cache_url), ("round_robin", rr_url)):
                rows[name].append(run(url, workers, prompts, args.concurrency, args.max_new_tokens))
                print(f"[{rep}] {name}: {rows[name][-1]}", file=sys.stderr)
        rows["single_server"].append(run(workers[0], workers, prompts, args.concurrency, args.max_new_tokens))
        med = {k: {m: statistics.median(r[m] for r in v) for m in ("req_per_s", "hit_rate", "wall_s")}
               for k, v in rows.items()}
        out = {"config": vars(args) | {"replicas": 2, "threads_per_replica": max(1, args.num_threads // 2),
                                       "requests": len(prompts)},
               "runs": rows, "median": med,
               "cache_aware_decisions": httpx.get(cache_url + "/server_info", timeout=30).json()["router"]["decisions"],
               "throughput_ratio_cache_aware_vs_round_robin": med["cache_aware"]["req_per_s"]
               / med["round_robin"]["req_per_s"]}
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "bench_router.json").write_text(json.dumps(out, indent=2))
        print(f"cache_aware decisions: {out['cache_aware_decisions']}", file=sys.stderr)
        print(f"\n{len(prompts)} requests, {args.system_prompts} system prompts, concurrency {args.concurrency}, "
              f"2 replicas x {max(1, args.num_threads // 2)} thread(s)\n")
        print("| policy | cache hit rate | req/s | wall s | throughput vs round_robin |\n|---|---|---|---|---|")
        for k in ("cache_aware", "round_robin", "single_server"):
            m = med[k]
            print(f"| {k}{' (1 replica)' if k == 'single_server' else ''} | {m['hit_rate']:.1%} | "
                  f"{m['req_per_s']:.2f} | {m['wall_s']:.1f} | {m['req_per_s'] / med['round_robin']['req_per_s']:.2f}x |")
    finally:
        stop_processes(reversed(procs))

if __name__ == "__main__":
    main()

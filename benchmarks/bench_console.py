"""What an open web console costs the server: decode throughput under a fixed load with nobody polling,
with one dashboard polling `/v1/stats` at 1 Hz (what the page does), and at 10 Hz (ten open pages),
plus the latency of `/v1/stats` itself against `/health` (the cheapest route) in the same run.

    python benchmarks/bench_console.py --num-threads 1 --phase-seconds 10 --repeats 2

Phases alternate (off, 1 Hz, 10 Hz, off, 1 Hz, 10 Hz, ...) so machine noise hits all of them alike;
ratios are against the "off" phases of the same run. Writes benchmarks/results/bench_console.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from sgl.runtime.processes import start_healthy_server

RESULTS = Path(__file__).resolve().parent / "results"
PROMPT = "Write a short story about a lighthouse keeper and a storm:"


def launch(num_threads: int) -> tuple[subprocess.Popen, str]:
    return start_healthy_server(["--model-path", "default", "--max-total-tokens", "16384", "--log-level", "warning"],
                                num_threads)


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def generated_tokens(url: str) -> int:
    r = httpx.get(url + "/server_info", timeout=60)
    r.raise_for_status()
    return int(r.json()["internal_states"][0]["generation_tokens_total"])


def run_phase(url: str, pid: int, seconds: float, poll_hz: float, clients: int,
              warm_up: bool = False) -> dict[str, Any]:
    stop = threading.Event()
    tokens = [0] * clients
    stats_ms: list[float] = []

    def client(i: int) -> None:
        with httpx.Client(timeout=300) as c:
            while not stop.is_set():
                r = c.post(url + "/generate", json={"text": PROMPT, "sampling_params": {
                    "max_new_tokens": 32, "temperature": 0.8, "ignore_eos": True}})
                r.raise_for_status()  # NOTE: a failing load must not pass for a slow one
                if not stop.is_set():
                    tokens[i] += r.json()["meta_info"]["completion_tokens"]

    def poller() -> None:
        with httpx.Client(timeout=30) as c:
            while not stop.wait(1.0 / poll_hz):
                t = time.perf_counter()
                c.get(url + "/v1/stats").raise_for_status()
                stats_ms.append((time.perf_counter() - t) * 1000)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    if poll_hz > 0:
        threads.append(threading.Thread(target=poller))
    # NOTE: tokens from the engine's counter, not from finished requests (a phase holds only a few of them)
    gen0 = generated_tokens(url)
    cpu0, t0 = cpu_seconds(pid), time.perf_counter()
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    elapsed, cpu = time.perf_counter() - t0, cpu_seconds(pid) - cpu0
    generated = generated_tokens(url) - gen0
    for t in threads:
        t.join()
    if not generated and not warm_up:
        raise SystemExit("the load generated no tokens (see the client errors above)")
    return {"poll_hz": poll_hz, "seconds": elapsed, "tokens": generated, "requests_tokens": sum(tokens),
            "tok_per_s": generated / elapsed, "server_cpu_s_per_token": cpu / max(generated, 1), "stats_ms": stats_ms}


def latency_ms(url: str, path: str, n: int) -> list[float]:
    out = []
    with httpx.Client(timeout=30) as c:
        for _ in range(n):
            t = time.perf_counter()
            c.get(url + path).raise_for_status()
            out.append((time.perf_counter() - t) * 1000)
    return sorted(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-threads", type=int, default=1)
    ap.add_argument("--phase-seconds", type=float, default=10.0)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--clients", type=int, default=4)
    args = ap.parse_args()
    proc, url = launch(args.num_threads)
    try:
        idle = {p: latency_ms(url, p, 200) for p in ("/health", "/v1/stats")}
        run_phase(url, proc.pid, 3.0, 0, args.clients, warm_up=True)
        phases = [run_phase(url, proc.pid, args.phase_seconds, hz, args.clients)
                  for _ in range(args.repeats) for hz in (0, 1, 10)]
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    rows = []
    base = statistics.mean(p["tok_per_s"] for p in phases if p["poll_hz"] == 0)
    base_cpu = statistics.mean(p["server_cpu_s_per_token"] for p in phases if p["poll_hz"] == 0)
    for hz in (0, 1, 10):
        ps = [p for p in phases if p["poll_hz"] == hz]
        lat = sorted(x for p in ps for x in p["stats_ms"])
        tps = statistics.mean(p["tok_per_s"] for p in ps)
        cpu = statistics.mean(p["server_cpu_s_per_token"] for p in ps)
        rows.append({"poll_hz": hz, "tok_per_s": tps, "ratio_vs_off": tps / base,
                     "server_cpu_ms_per_token": cpu * 1000, "cpu_ratio_vs_off": cpu / base_cpu,
                     "stats_p50_ms_under_load": lat[len(lat) // 2] if lat else None,
                     "stats_p99_ms_under_load": lat[min(int(len(lat) * 0.99), len(lat) - 1)] if lat else None})
    print(f"threads={args.num_threads} clients={args.clients} phase={args.phase_seconds}s x{args.repeats}")
    print("| /v1/stats polling | decode tok/s | vs off | server CPU ms/token | vs off | /v1/stats p50 / p99 under load |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        lat = "-" if r["stats_p50_ms_under_load"] is None else \
            f"{r['stats_p50_ms_under_load']:.1f} / {r['stats_p99_ms_under_load']:.1f} ms"
        print(f"| {'off' if r['poll_hz'] == 0 else str(r['poll_hz']) + ' Hz'} | {r['tok_per_s']:.1f} | "
              f"{r['ratio_vs_off']:.3f} | {r['server_cpu_ms_per_token']:.1f} | {r['cpu_ratio_vs_off']:.3f} | {lat} |")
    med = {p: v[len(v) // 2] for p, v in idle.items()}
    print(f"idle latency p50: /health {med['/health']:.2f} ms, /v1/stats {med['/v1/stats']:.2f} ms "
          f"(ratio {med['/v1/stats'] / med['/health']:.2f})")
    RESULTS.mkdir(exist_ok=True)
    out = {"args": vars(args), "rows": rows, "idle_p50_ms": med,
           "phases": [{k: v for k, v in p.items() if k != "stats_ms"} for p in phases]}
    (RESULTS / "bench_console.json").write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()

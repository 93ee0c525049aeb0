"""What API keys, budgets and usage accounting cost a request, and what a readiness probe costs.

    python benchmarks/bench_tenancy.py --num-threads 1 --requests 40

1. In process: `Tenancy.admit` + `Tenancy.record` per request (the middleware's check and the
   runner's accounting), with the SQLite ledger in a file (WAL) and in memory.
2. Two servers side by side on the default model: one with `--api-keys`, `--usage-db` and prices, one
   with only `--api-key` (the baseline). 1-token `/generate` requests alternate between them, one at
   a time, so machine noise hits both alike; the table gives medians and the ratio.
3. On the tenancy server, idle: `/health` (liveness) against `/health/ready` (all checks, including the
   1-token generation). Writes benchmarks/results/bench_tenancy.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from sgl.runtime.processes import start_healthy_server
from sgl.runtime.tenancy import Prices, Tenancy, Usage, UsageLedger, parse_api_keys

RESULTS = Path(__file__).resolve().parent / "results"
KEYS = {"sk-bench": {"name": "bench", "daily_token_budget": 10**12, "requests_per_minute": 10**9},
        "sk-admin": {"name": "ops", "admin": True}}


def ledger_cost(path: str, n: int) -> float:
    """Microseconds per request for admit + record."""
    tenancy = Tenancy(parse_api_keys(KEYS), UsageLedger(path, "Europe/Paris"), Prices(1.0, 2.0, 0.5))
    tenant = tenancy.authenticate("sk-bench")
    start = time.perf_counter()
    for _ in range(n):
        tenancy.admit(tenant)
        tenancy.record(tenant, Usage(prompt_tokens=500, cached_tokens=400, completion_tokens=50))
    took = time.perf_counter() - start
    tenancy.close()
    return took / n * 1e6


def launch(num_threads: int, *extra: str) -> tuple[subprocess.Popen, str]:
    return start_healthy_server(["--model-path", "default", "--max-total-tokens", "16384", "--log-level", "warning",
                                 *extra], num_threads)


def timed(c: httpx.Client, method: str, url: str, **kw: Any) -> float:
    start = time.perf_counter()
    r = c.request(method, url, **kw)
    took = time.perf_counter() - start
    assert r.status_code == 200, r.text
    return took


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--num-threads", type=int, default=1)
    ap.add_argument("--requests", type=int, default=40)
    ap.add_argument("--ledger-ops", type=int, default=2000)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-tenancy-"))
    out: dict[str, Any] = {"num_threads": args.num_threads, "requests": args.requests}
    out["ledger_us_per_request_file"] = ledger_cost(str(tmp / "ledger.db"), args.ledger_ops)
    out["ledger_us_per_request_memory"] = ledger_cost(":memory:", args.ledger_ops)

    (tmp / "keys.json").write_text(json.dumps(KEYS))
    tenancy_args = ["--api-keys", str(tmp / "keys.json"), "--usage-db", str(tmp / "usage.db"),
                    "--price-input", "1", "--price-output", "2"]
    procs = []
    try:
        p1, with_url = launch(args.num_threads, *tenancy_args)
        procs.append(p1)
        p2, base_url = launch(args.num_threads, "--api-key", "sk-bench")
        procs.append(p2)
        body = {"text": "The capital of France is", "sampling_params": {"max_new_tokens": 1, "temperature": 0}}
        hdr = {"Authorization": "Bearer sk-bench"}
        with httpx.Client(timeout=60) as c:
            for url in (with_url, base_url):  # warm-up
                for _ in range(3):
                    timed(c, "POST", url + "/generate", json=body, headers=hdr)
            t_with, t_base = [], []
            for _ in range(args.requests):
                t_with.append(timed(c, "POST", with_url + "/generate", json=body, headers=hdr))
                t_base.append(timed(c, "POST", base_url + "/generate", json=body, headers=hdr))
            t_live, t_ready = [], []
            for _ in range(args.requests):
                t_live.append(timed(c, "GET", with_url + "/health"))
                t_ready.append(timed(c, "GET", with_url + "/health/ready"))
            usage = c.get(with_url + "/v1/usage", params={"key": "bench"},
                          headers={"Authorization": "Bearer sk-admin"}).json()["keys"][0]
    finally:
        for p in procs:
            p.terminate()
            p.wait(timeout=60)
    med = statistics.median
    out.update({
        "generate_1tok_ms_tenancy": med(t_with) * 1e3, "generate_1tok_ms_baseline": med(t_base) * 1e3,
        "generate_ratio": med(t_with) / med(t_base),
        "health_ms": med(t_live) * 1e3, "health_ready_ms": med(t_ready) * 1e3,
        "accounted_requests": usage["requests"],
    })
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "bench_tenancy.json").write_text(json.dumps(out, indent=2))
    print(f"threads={args.num_threads} requests={args.requests}")
    print("| measurement | value |\n|---|---|")
    print(f"| admit + record, SQLite file (WAL) | {out['ledger_us_per_request_file']:.0f} us/request |")
    print(f"| admit + record, SQLite in memory | {out['ledger_us_per_request_memory']:.0f} us/request |")
    print(f"| 1-token /generate, baseline (--api-key) | {out['generate_1tok_ms_baseline']:.1f} ms (median) |")
    print(f"| 1-token /generate, --api-keys + --usage-db + prices | {out['generate_1tok_ms_tenancy']:.1f} ms "
          f"(ratio {out['generate_ratio']:.3f}) |")
    print(f"| /health | {out['health_ms']:.2f} ms |")
    print(f"| /health/ready (idle: runs the 1-token probe) | {out['health_ready_ms']:.1f} ms |")


if __name__ == "__main__":
    main()

"""Soak: mixed traffic against a live server for a while; memory must stay flat and nothing may leak.

    python benchmarks/soak.py --minutes 30            # starts its own server (the default model)
    python benchmarks/soak.py --url http://127.0.0.1:30000 --minutes 5 --pid 1234

Traffic, from `--clients` threads: streams read to the end, streams dropped after a few tokens
(disconnects), streams aborted by rid, regex and JSON-schema constrained requests, OpenAI chat, and
bad requests (each must be a 400). Every `--interval` s it samples the server's RSS, open file
descriptors, threads, KV pool use and the KV pool's resident pages. At the end (idle) it runs
/check_integrity. It fails (exit 1) when the RSS minus the KV pool's first-touched pages grows faster
than `--max-rss-slope` MB/min after the warm-up (the raw RSS slope is reported too), when fds or threads grow,
when any response is a 5xx, or when the integrity check fails. Results: benchmarks/results/soak.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import threading
import time
from pathlib import Path
from typing import Any, Optional

import httpx
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SCHEMA = json.dumps({"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                                      "age": {"type": "integer"}}, "required": ["name", "age"]})


def one_request(c: httpx.Client, rnd: random.Random, i: int, counts: dict[str, int]) -> None:
    kind = rnd.choice(["stream", "disconnect", "abort", "regex", "json", "chat", "bad", "batch"])
    sp: dict[str, Any] = {"max_new_tokens": rnd.randint(4, 12), "temperature": rnd.choice([0, 0.8])}
    prompt = f"Request {i}: write a short note about the number {rnd.randint(0, 10**6)}."
    status = 0
    if kind in ("stream", "disconnect", "abort"):
        rid = f"soak-{os.getpid()}-{i}"
        with c.stream("POST", "/generate", json={"text": prompt, "stream": True, "rid": rid,
                                                  "sampling_params": {**sp, "max_new_tokens": 24, "ignore_eos": True}}) as r:
            status = r.status_code
            for n, _ in enumerate(r.iter_lines()):
                if kind == "disconnect" and n >= 3:
                    break  # closing the stream = a client disconnect
                if kind == "abort" and n == 3:
                    c.post("/abort_request", json={"rid": rid})
    elif kind == "regex":
        status = c.post("/generate", json={"text": prompt, "sampling_params": {**sp, "regex": r"[0-9]{3}-[a-z]{2,5}"}}
                        ).status_code
    elif kind == "json":
        status = c.post("/generate", json={"text": prompt, "sampling_params": {**sp, "json_schema": SCHEMA}}).status_code
    elif kind == "chat":
        status = c.post("/v1/chat/completions", json={"model": "default", "max_tokens": sp["max_new_tokens"],
                                                      "messages": [{"role": "user", "content": prompt}]}).status_code
    elif kind == "batch":
        status = c.post("/generate", json={"text": [prompt, prompt + "!"], "sampling_params": sp}).status_code
    else:
        bad = rnd.choice([{"text": prompt, "sampling_params": {"top_p": 7}}, {"input_ids": [10**9]},
                          {"text": prompt, "sampling_params": {"regex": "(unclosed"}}, {"text": ""}])
        status = c.post("/generate", json=bad).status_code
        assert status == 400, (bad, status)
        status = 200
    key = f"{kind}:{status}"
    counts[key] = counts.get(key, 0) + 1


def client_loop(url: str, seed: int, stop: threading.Event, counts: dict[str, int], errors: list[str]) -> None:
    rnd = random.Random(seed)
    with httpx.Client(base_url=url, timeout=120) as c:
        i = 0
        while not stop.is_set():
            i += 1
            try:
                one_request(c, rnd, seed * 1_000_000 + i, counts)
            except Exception as exc:  # noqa: BLE001 - reported, and fails the run
                errors.append(f"{type(exc).__name__}: {exc}")


def sample(proc: psutil.Process, url: str, t0: float) -> dict[str, Any]:
    with proc.oneshot():
        rss = proc.memory_info().rss
        fds, threads = proc.num_fds(), proc.num_threads()
    info = httpx.get(url + "/server_info", timeout=30).json()
    stats = info["internal_states"][0]
    kv_mb = float(info.get("kv_pool_resident_bytes") or 0) / 2**20
    return {"t": round(time.monotonic() - t0, 1), "rss_mb": round(rss / 2**20, 1), "kv_resident_mb": round(kv_mb, 1),
            # NOTE: the KV pool is allocated untouched; its pages join the RSS as slots are first used (bounded
            # by the pool). RSS minus them is what a leak would grow.
            "rss_minus_kv_mb": round(rss / 2**20 - kv_mb, 1), "fds": fds, "threads": threads,
            "kv_usage": round(float(stats.get("token_usage") or 0.0), 4),  # 1 - free / pool (cached counts as used)
            "running": stats.get("num_running_reqs")}


def slope_mb_per_min(samples: list[dict[str, Any]], key: str = "rss_minus_kv_mb") -> float:
    """Least-squares slope of `key` over time, MB per minute."""
    if len(samples) < 2:
        return 0.0
    ts = [s["t"] / 60 for s in samples]
    ys = [s[key] for s in samples]
    mt, my = sum(ts) / len(ts), sum(ys) / len(ys)
    var = sum((t - mt) ** 2 for t in ts)
    return sum((t - mt) * (y - my) for t, y in zip(ts, ys)) / var if var else 0.0


def run(url: str, pid: int, seconds: float, warmup: float, interval: float, clients: int) -> dict[str, Any]:
    proc = psutil.Process(pid)
    stop = threading.Event()
    counts: dict[str, int] = {}
    errors: list[str] = []
    t0 = time.monotonic()
    threads = [threading.Thread(target=client_loop, args=(url, k + 1, stop, counts, errors), daemon=True)
               for k in range(clients)]
    for t in threads:
        t.start()
    samples = []
    while time.monotonic() - t0 < seconds:
        time.sleep(min(interval, max(seconds - (time.monotonic() - t0), 0.1)))
        samples.append(sample(proc, url, t0))
        print(json.dumps(samples[-1]), flush=True)
    stop.set()
    for t in threads:
        t.join(timeout=180)
    end = time.monotonic() + 60
    while time.monotonic() < end and sample(proc, url, t0)["running"]:
        time.sleep(0.5)
    integrity = httpx.get(url + "/check_integrity", timeout=60)
    final = sample(proc, url, t0)
    steady = [s for s in samples if s["t"] >= warmup] or samples
    return {"seconds": seconds, "warmup_s": warmup, "clients": clients, "requests": sum(counts.values()),
            "counts": dict(sorted(counts.items())), "errors": errors[:20], "num_errors": len(errors),
            "server_errors": sum(v for k, v in counts.items() if k.split(":")[1].startswith("5")),
            "rss_slope_mb_per_min": round(slope_mb_per_min(steady), 2),  # RSS minus first-touched KV pages
            "raw_rss_slope_mb_per_min": round(slope_mb_per_min(steady, "rss_mb"), 2),
            "rss_mb_first": steady[0]["rss_mb"], "rss_mb_last": final["rss_mb"],
            "rss_minus_kv_mb_first": steady[0]["rss_minus_kv_mb"], "rss_minus_kv_mb_last": final["rss_minus_kv_mb"],
            "kv_resident_mb_last": final["kv_resident_mb"],
            "fds_first": steady[0]["fds"], "fds_last": final["fds"],
            "threads_first": steady[0]["threads"], "threads_last": final["threads"],
            "kv_usage_max": max((x["kv_usage"] for x in samples), default=0.0),
            "integrity_ok": integrity.status_code == 200,
            "integrity": integrity.text[:300], "samples": samples}


def verdict(res: dict[str, Any], max_slope: float) -> list[str]:
    bad = []
    if res["rss_slope_mb_per_min"] > max_slope:
        bad.append(f"RSS minus first-touched KV pages grows {res['rss_slope_mb_per_min']} MB/min (limit {max_slope})")
    if res["fds_last"] > res["fds_first"] + 8:
        bad.append(f"open fds grew {res['fds_first']} -> {res['fds_last']}")
    if res["threads_last"] > res["threads_first"] + 4:
        bad.append(f"threads grew {res['threads_first']} -> {res['threads_last']}")
    if res["server_errors"] or res["num_errors"]:
        bad.append(f"{res['server_errors']} 5xx responses, {res['num_errors']} client errors: {res['errors'][:3]}")
    if not res["integrity_ok"]:
        bad.append(f"KV integrity (idle): {res['integrity']}")
    return bad


def plot(res: dict[str, Any], path: str) -> None:
    """RSS, RSS minus the KV pool's resident pages, and the KV pool's resident pages over time (PNG)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    samples = res["samples"]
    t = [x["t"] / 60 for x in samples]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot(t, [x["rss_mb"] for x in samples], label="server RSS")
    ax.plot(t, [x["rss_minus_kv_mb"] for x in samples], label="RSS minus KV pool pages touched")
    ax.plot(t, [x["kv_resident_mb"] for x in samples], label="KV pool pages touched", linestyle="--")
    ax.set_xlabel("minutes")
    ax.set_ylabel("MB")
    ax.set_ylim(bottom=0)
    ax.set_title(f"soak: {res['requests']} requests, slope {res['rss_slope_mb_per_min']} MB/min (minus KV)")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--url")
    ap.add_argument("--pid", type=int, help="the server's pid (with --url)")
    ap.add_argument("--minutes", type=float, default=3.0)
    ap.add_argument("--warmup", type=float, default=30.0, help="seconds excluded from the RSS slope")
    ap.add_argument("--interval", type=float, default=10.0)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--max-rss-slope", type=float, default=5.0, help="MB/min after the warm-up")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "soak.json"))
    ap.add_argument("--plot", help="also write a PNG of memory over time here")
    ap.add_argument("--plot-from", help="only plot this earlier result JSON (to --plot) and exit")
    args = ap.parse_args(argv)
    if args.plot_from:
        plot(json.loads(Path(args.plot_from).read_text()), args.plot or args.plot_from.replace(".json", ".png"))
        return 0
    if args.url:
        res = run(args.url, args.pid, args.minutes * 60, args.warmup, args.interval, args.clients)
    else:
        from tests.e2e.server_helpers import running_server
        with running_server("--max-running-requests", "16") as server:
            res = run(server.url, server.proc.pid, args.minutes * 60, args.warmup, args.interval, args.clients)
    res["problems"] = verdict(res, args.max_rss_slope)
    res["threads_torch"] = 1
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))
    if args.plot:
        plot(res, args.plot)
    summary = {k: v for k, v in res.items() if k not in ("samples", "integrity")}
    print(json.dumps(summary, indent=1))
    return 1 if res["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())

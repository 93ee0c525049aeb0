"""Prefill/decode disaggregation: KV transfer cost, and decode inter-token latency while long prompts arrive.

    python benchmarks/bench_pd.py --transfer-tokens 1024 --decode-tokens 48 --long-prompts 3 --long-tokens 768

1. KV transfer per 1K tokens of the default model's KV ([2, 30 layers, 1024, 3 kv heads, 64] float32,
   47 MB): the shared-memory transfer the servers use (tensor -> segment -> tensor; segments are
   reused, so the first transfer also pays the page faults) vs torch.distributed point-to-point
   (gloo send/recv between two processes on this machine, into a fresh or a reused buffer).
2. Decode ITL: one streamed greedy request (`--decode-tokens`, ignore_eos) measured from its SSE
   events, while `--long-prompts` prompts of `--long-tokens` tokens arrive one after another (each
   max_new_tokens 1). Three set-ups, each on fresh servers with 1 thread per server process:
   one server with chunked prefill (--chunked-prefill-size 256), one server unchunked (-1), and a
   prefill + decode pair behind `sgl router --prefill --decode` (long prompts and the stream both go
   through the router; the long prompts' prefill runs on the prefill server).
Reported: ITL p50 / p99 / max (ms). Writes benchmarks/results/bench_pd.json. NOTE: the machine has 2
cores shared with other jobs; the PD pair's two servers compete for them, and the load is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from sgl.runtime.processes import free_port, wait_healthy

RESULTS = Path(__file__).resolve().parent / "results"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}


# ---- 1. transfer ------------------------------------------------------------------------------
def _p2p_rank(rank: int, port: int, shape: list[int], repeats: int, out: str) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    kv = torch.randn(shape) if rank == 0 else torch.empty(shape)
    times: dict[str, list[float]] = {"fresh": [], "reused": []}
    for mode in ("fresh", "reused"):
        for _ in range(repeats + 1):
            dist.barrier()
            t0 = time.perf_counter()
            if rank == 0:
                dist.send(kv, 1)
            else:  # fresh: a new receive buffer per transfer (first-touch page faults), reused: one buffer
                dist.recv(torch.empty(shape) if mode == "fresh" else kv, 0)
            dist.barrier()
            times[mode].append(time.perf_counter() - t0)
    if rank == 1:
        Path(out).write_text(json.dumps({k: v[1:] for k, v in times.items()}))
    dist.destroy_process_group()


def bench_transfer(tokens: int, repeats: int) -> dict[str, float]:
    import tempfile

    import torch
    import torch.multiprocessing as mp

    from sgl.runtime.distributed.kv_transfer import SharedMemoryTransfer

    shape = [2, 30, tokens, 3, 64]
    kv = torch.randn(shape)
    dest = torch.randn(shape)  # stands for the decode server's (already touched) KV pool
    t = SharedMemoryTransfer(timeout_s=60)
    shm = []
    for _ in range(repeats + 1):  # the serving path: pool -> new segment -> pool
        t0 = time.perf_counter()
        handle = t.put_with(tuple(shape), kv.dtype, lambda buf: buf.copy_(kv))
        with t.opened(handle) as view:
            dest.copy_(view)
        shm.append(time.perf_counter() - t0)
    assert torch.equal(dest, kv)
    t.close()
    out = tempfile.mktemp()
    mp.start_processes(_p2p_rank, args=(free_port(), shape, repeats, out), nprocs=2, start_method="fork")
    p2p = json.loads(Path(out).read_text())
    scale = 1024 / tokens
    return {"mb_per_1k_tokens": kv.numel() * 4 / 1e6 * scale, "shm_ms_per_1k": statistics.median(shm[1:]) * 1e3 * scale,
            "shm_first_ms_per_1k": shm[0] * 1e3 * scale,
            "p2p_gloo_fresh_ms_per_1k": statistics.median(p2p["fresh"]) * 1e3 * scale,
            "p2p_gloo_reused_ms_per_1k": statistics.median(p2p["reused"]) * 1e3 * scale}


# ---- 2. ITL ---------------------------------------------------------------------------------
def start(args: list[str]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "sgl.launch_server", "--model-path", "default", "--num-threads", "1",
                             "--port", str(port), "--max-total-tokens", "16384", "--log-level", "warning", *args],
                            env=ENV, stdin=subprocess.DEVNULL)
    return proc, f"http://127.0.0.1:{port}"


def long_prompt(i: int, tokens: int) -> list[int]:
    return [(1000 + 7 * i + 13 * k) % 40000 + 100 for k in range(tokens)]


def measure_itl(url: str, args: argparse.Namespace) -> dict[str, float]:
    httpx.post(url + "/generate", json={"text": "warm up", "sampling_params": {"max_new_tokens": 2}}, timeout=300)
    stamps: list[float] = []
    started = threading.Event()

    def stream() -> None:
        body = {"text": "Write a long story about a lighthouse keeper.", "stream": True,
                "sampling_params": {"max_new_tokens": args.decode_tokens, "temperature": 0, "ignore_eos": True}}
        with httpx.stream("POST", url + "/generate", json=body, timeout=600) as r:
            for line in r.iter_lines():
                if line.startswith("data:") and "[DONE]" not in line:
                    stamps.append(time.perf_counter())
                    started.set()

    th = threading.Thread(target=stream)
    th.start()
    started.wait(120)
    for i in range(args.long_prompts):
        httpx.post(url + "/generate", timeout=600, json={"input_ids": long_prompt(i, args.long_tokens),
                                                         "sampling_params": {"max_new_tokens": 1}})
    th.join()
    itl = sorted((b - a) * 1e3 for a, b in zip(stamps, stamps[1:]))
    return {"itl_p50_ms": itl[len(itl) // 2], "itl_p99_ms": itl[min(len(itl) - 1, int(len(itl) * 0.99))],
            "itl_max_ms": itl[-1], "tokens": len(stamps)}


def bench_itl(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, flags in (("one server, chunked (256)", ["--chunked-prefill-size", "256"]),
                        ("one server, unchunked", ["--chunked-prefill-size", "-1"])):
        proc, url = start(flags)
        try:
            wait_healthy(url, proc)
            out[name] = measure_itl(url, args)
        finally:
            proc.terminate()
            proc.wait(timeout=60)
        print(name, out[name], flush=True)
    pre, pre_url = start(["--disaggregation-mode", "prefill"])
    dec, dec_url = start(["--disaggregation-mode", "decode"])
    port = free_port()
    rtr = subprocess.Popen([sys.executable, "-m", "sgl.cli", "router", "--prefill", pre_url, "--decode", dec_url,
                            "--port", str(port), "--log-level", "warning"], env=ENV, stdin=subprocess.DEVNULL)
    try:
        wait_healthy(pre_url, pre)
        wait_healthy(dec_url, dec)
        wait_healthy(f"http://127.0.0.1:{port}", rtr)
        out["prefill + decode (PD)"] = measure_itl(f"http://127.0.0.1:{port}", args)
    finally:
        for p in (rtr, pre, dec):
            p.terminate()
            p.wait(timeout=60)
    print("PD", out["prefill + decode (PD)"], flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--transfer-tokens", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--decode-tokens", type=int, default=48)
    ap.add_argument("--long-prompts", type=int, default=3)
    ap.add_argument("--long-tokens", type=int, default=768)
    ap.add_argument("--skip-itl", action="store_true")
    args = ap.parse_args()
    transfer = bench_transfer(args.transfer_tokens, args.repeats)
    print("transfer", transfer, flush=True)
    itl = {} if args.skip_itl else bench_itl(args)
    load = os.getloadavg()
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "bench_pd.json").write_text(json.dumps({"config": vars(args), "load_avg": load, "transfer": transfer,
                                                       "itl": itl}, indent=2))
    print(f"\n| KV transfer, 1K tokens ({transfer['mb_per_1k_tokens']:.0f} MB) | ms |\n|---|---|")
    print(f"| shared memory, a reused segment (the serving path, steady state) | {transfer['shm_ms_per_1k']:.1f} |")
    print(f"| shared memory, the first transfer (a new segment: page faults) | {transfer['shm_first_ms_per_1k']:.1f} |")
    print(f"| torch.distributed p2p (gloo), a new receive buffer per transfer | {transfer['p2p_gloo_fresh_ms_per_1k']:.1f} |")
    print(f"| torch.distributed p2p (gloo), one reused receive buffer | {transfer['p2p_gloo_reused_ms_per_1k']:.1f} |")
    if itl:
        print("\n| set-up (1 thread per server) | ITL p50 ms | p99 ms | max ms |\n|---|---|---|---|")
        for name, r in itl.items():
            print(f"| {name} | {r['itl_p50_ms']:.0f} | {r['itl_p99_ms']:.0f} | {r['itl_max_ms']:.0f} |")
    print(f"load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")


if __name__ == "__main__":
    main()

"""Resident set of the server with the default model, native (GGUF blocks) vs fp32 weights, and where it goes.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_memory.py [--threads 1] [--formats fp32 native] [--no-stages]

Per weight format: a real `sgl.launch_server` on 127.0.0.1 (its own process, so nothing of this script
is counted), its VmRSS when healthy, then after a short chat completion (openai SDK), a 701-token prompt
and a JSON-schema request (httpx on /generate); VmHWM is the peak. Then (unless --no-stages) the same
requests in-process, with /proc/self/smaps_rollup read after each load stage (import torch, import the
engine, load the weights + KV pool, the first step, the 701-token prompt, the JSON-schema request and within
it the grammar compiler, which the engine builds on the first constrained request): what is resident besides
the weights. Prints both tables; JSON to benchmarks/results/bench_memory.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from proc_stats import status_mb  # benchmarks/, the script's folder

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

ROOT = Path(__file__).resolve().parents[1]
PERSON = json.loads((ROOT / "examples/data/person_extraction.json").read_text())
LONG_PROMPT = "alpha bravo charlie delta echo " * 100  # 701 tokens with the default tokenizer


def requests(url: str) -> None:
    import httpx
    import openai
    client = openai.OpenAI(base_url=url + "/v1", api_key="none")
    client.chat.completions.create(model="default", messages=[{"role": "user", "content": "Say hello."}],
                                   max_tokens=16, temperature=0)
    for body in ({"text": LONG_PROMPT, "sampling_params": {"max_new_tokens": 16, "temperature": 0}},
                 {"text": PERSON["prompt"], "sampling_params": {"max_new_tokens": 64, "temperature": 0,
                                                                 "json_schema": json.dumps(PERSON["schema"])}}):
        httpx.post(url + "/generate", json=body, timeout=600).raise_for_status()


def server_rss(fmt: str, threads: int) -> dict[str, Any]:
    from sgl.runtime.processes import start_healthy_server, stop_processes
    proc, url = start_healthy_server(["--model-path", "default", "--weight-format", fmt], num_threads=threads)
    try:
        time.sleep(1.0)
        res: dict[str, Any] = {"healthy": status_mb(proc.pid)}
        requests(url)
        time.sleep(0.5)
        res["after_requests"] = status_mb(proc.pid)
    finally:
        stop_processes([proc], timeout=30)
    return res


def stages(fmt: str, threads: int) -> list[tuple[str, dict[str, float]]]:
    """In a fresh process: the resident set after each load stage (this function runs as --stage-worker)."""
    out = [("python", status_mb())]
    import torch
    torch.set_num_threads(threads)
    out.append(("import torch", status_mb()))
    from sgl.runtime import engine as engine_mod
    out.append(("import the engine", status_mb()))
    grammar = engine_mod.make_grammar_compiler

    def timed_grammar(*a: Any, **k: Any) -> Any:  # NOTE: built lazily, by the first constrained request
        g = grammar(*a, **k)
        out.append(("  of which the grammar compiler", {"Rss": status_mb()["Rss"] - before}))
        return g

    engine_mod.make_grammar_compiler = timed_grammar
    eng = engine_mod.Engine(num_threads=threads, show_progress=False, weight_format=fmt)
    out.append(("weights + KV pool + scheduler (idle)", status_mb()))
    eng.generate("Say hello.", {"max_new_tokens": 16, "temperature": 0})
    out.append(("first requests (16 tokens)", status_mb()))
    eng.generate(LONG_PROMPT, {"max_new_tokens": 16, "temperature": 0})
    out.append(("a 701-token prompt", status_mb()))
    before = status_mb()["Rss"]
    eng.generate(PERSON["prompt"], {"max_new_tokens": 64, "temperature": 0, "json_schema": json.dumps(PERSON["schema"])})
    out.append(("a JSON-schema request", status_mb()))
    out.append(("(KV pool resident)", {"Rss": eng.scheduler.runner.kv.resident_bytes() / 2**20}))
    eng.shutdown()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--formats", nargs="+", default=["fp32", "native"], choices=["fp32", "native"])
    ap.add_argument("--no-stages", action="store_true")
    ap.add_argument("--stage-worker", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.stage_worker:
        print(json.dumps(stages(a.stage_worker, a.threads)))
        return
    res: dict[str, Any] = {"threads": a.threads, "load_avg_start": os.getloadavg(), "server": {}, "stages": {}}
    for fmt in a.formats:
        res["server"][fmt] = server_rss(fmt, a.threads)
        if not a.no_stages:
            env = dict(os.environ, OMP_NUM_THREADS=str(a.threads))
            p = subprocess.run([sys.executable, __file__, "--stage-worker", fmt, "--threads", str(a.threads)],
                               capture_output=True, text=True, env=env, check=True)
            res["stages"][fmt] = json.loads(p.stdout.strip().splitlines()[-1])
    res["load_avg_end"] = os.getloadavg()

    print(f"\nbench_memory ({a.threads} thread(s), load {res['load_avg_start'][0]:.1f} -> {res['load_avg_end'][0]:.1f})")
    print("| server VmRSS MB | " + " | ".join(a.formats) + " | native / fp32 |")
    print("|---|" + "---|" * len(a.formats) + "---|")
    for when, key in (("healthy (idle)", "VmRSS"), ("after requests", "VmRSS"), ("peak (VmHWM)", "VmHWM")):
        part = "healthy" if when.startswith("healthy") else "after_requests"
        vals = [res["server"][f][part][key] for f in a.formats]
        r = f"{vals[a.formats.index('native')] / vals[a.formats.index('fp32')]:.2f}x" \
            if {"fp32", "native"} <= set(a.formats) else "n/a"
        print(f"| {when} | " + " | ".join(f"{v:.0f}" for v in vals) + f" | {r} |")
    for fmt, rows in res["stages"].items():
        print(f"\nstages, {fmt} (in-process Engine): Rss MB (anonymous / file), delta")
        prev = 0.0
        for name, m in rows:
            rss = m["Rss"]
            split = f" ({m['Anonymous']:.0f} / {m['file']:.0f})" if "Anonymous" in m else ""
            delta = f"  +{rss - prev:.0f}" if not name.startswith(("(", " ")) else ""
            print(f"  {name:40s} {rss:6.0f}{split}{delta}")
            if not name.startswith(("(", " ")):
                prev = rss
    out = ROOT / "benchmarks" / "results" / "bench_memory.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(res, indent=2))
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()

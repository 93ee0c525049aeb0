"""CPU speed on the default model's GGUF (SmolLM2-135M Q4_1), ours vs llama.cpp and HF transformers, one run.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_cpu.py [--threads 1 2] [--weight-formats fp32 native]
        [--quick] [--llama-cpp-dir DIR] [--skip-hf] [--rows 1 2 3 4 5] [--cpu-act-quant q16|q8]
        [--disable-cpu-weight-packing]

Rows (each at every thread count, every peer on the same file):
1. batch-1 decode tok/s, 128 new tokens after a 64-token prompt, vs llama-bench tg128 and HF generate;
   also the fraction of the Q4_1 bandwidth floor (read bandwidth measured in the same process /
   Q4_1 weight bytes per token); 1b. decode CPU ms per token (process CPU time, tg129 minus tg17:
   load-independent, what a quiet machine's 1-thread step would take; see decode_cpu_ms);
2. prefill tok/s of a 512-token prompt vs llama-bench pp512 and HF;
3. 32 concurrent requests x 128 new tokens, output tok/s, vs llama-server --parallel 32;
4. 64 requests sharing a ~500-token system prompt (+ ~50-token question, 32 new tokens): total
   time vs llama-server with its prompt cache warm (the workload run once before, cache_prompt);
5. JSON-schema constrained vs unconstrained decode tok/s at batch 1 and batch 8 (ours only); also vs the
   same work unconstrained (each row as many tokens as its JSON row: the cost of constraining alone).
Plus the resident set (VmRSS after the runs, VmHWM peak) of our engine per weight format. Rows 3 and 4 also
report CPU seconds (user + system, all threads; ours: time.process_time, llama-server: /proc/PID/stat), which
a shared machine disturbs far less than the wall time.

Every configuration of ours runs in a fresh subprocess (its own thread count, clean RSS); a peer
that is not built, or a weight format the engine cannot run, is skipped with the reason. Ours runs
in-process (`Engine.generate`); llama-server is driven over HTTP on 127.0.0.1. Prints the table and
writes benchmarks/results/bench_cpu[_quick].json (or --out NAME).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Optional

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from proc_stats import cpu_seconds, status_mb  # noqa: E402 - benchmarks/, the script's folder
from sgl.runtime.processes import free_port, wait_healthy  # noqa: E402 - no torch: after the OMP policy

ROOT = Path(__file__).resolve().parents[1]
PEER_SCRIPT = ROOT.parent / "shared" / "peers" / "llama_cpp.sh"
WORDS = ("alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa "
         "quebec romeo sierra tango uniform victor whiskey xray yankee zulu").split()
PERSON = json.loads((ROOT / "examples/data/person_extraction.json").read_text())


def text_of(n_words: int, seed: int) -> str:
    return " ".join(WORDS[(i * 7 + seed * 13) % len(WORDS)] for i in range(n_words))


def sizes(quick: bool) -> dict[str, int]:
    return {"decode_new": 32 if quick else 128, "prefill_len": 128 if quick else 512,
            "b32_reqs": 8 if quick else 32, "b32_new": 16 if quick else 128,
            "shared_reqs": 8 if quick else 64, "json_new": 48 if quick else 96, "reps": 1 if quick else 3}


SYSTEM_PROMPT = "You are a careful assistant. " + text_of(265, 3)  # ~500 tokens


def shared_prompts(n: int) -> list[str]:
    return [SYSTEM_PROMPT + " Question %d: " % i + text_of(24, 100 + i) for i in range(n)]  # ~50 tokens each


def gguf_path() -> str:
    from sgl.runtime.models.default_model import resolve_model_path
    return resolve_model_path("default")


def read_bandwidth_gbs() -> float:
    """Read-only bandwidth (a sum over 256 MB) with torch's current thread count, best of 5."""
    import torch
    x = torch.ones(64 << 20, dtype=torch.float32)
    x.sum()
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t)
    return x.numel() * 4 / best / 1e9


# Decode CPU time per token (row 1b): the process's CPU seconds for N2 new tokens minus those for N1, over
# N2 - N1 (the prompt, set-up and first tokens cancel). On a shared machine the wall clock measures the
# scheduler's share as much as the code; CPU time does not (memory stalls count as CPU time, preemption
# does not), so at 1 thread it estimates the quiet-machine step. At 2 threads it also counts the time a
# helper spins for work (ours and llama.cpp's), so compare it at 1 thread.
CPU_N1, CPU_N2 = 17, 129


def decode_cpu_ms(eng: Any, prompt: list[int], greedy: dict[str, Any], reps: int) -> float:
    def cpu_of(n: int) -> float:
        eng.flush_cache()
        c = time.process_time()
        eng.generate(input_ids=prompt, sampling_params={"max_new_tokens": n, **greedy})
        return time.process_time() - c
    runs = [(cpu_of(CPU_N2) - cpu_of(CPU_N1)) / (CPU_N2 - CPU_N1) * 1e3 for _ in range(reps)]
    return statistics.median(runs)


def llama_bench_cpu_ms(d: Path, gguf: str, threads: int, reps: int) -> float:
    """llama-bench's CPU ms per decode token, by the same difference (tg CPU_N2 minus tg CPU_N1 runs)."""
    import resource

    def cpu_of(n: int) -> float:
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        subprocess.run([str(d / "bin/llama-bench"), "-m", gguf, "-t", str(threads), "-p", "0", "-n", str(n),
                        "-r", str(reps), "-o", "json", *NO_EXTRA_BUFFERS_BENCH], capture_output=True, check=True)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        return after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return (cpu_of(CPU_N2) - cpu_of(CPU_N1)) / ((CPU_N2 - CPU_N1) * reps) * 1e3


# ---- ours (one subprocess per weight format x threads) ------------------------------------------
def worker_ours(fmt: str, threads: int, rows: list[int], quick: bool, act: str = "q16",
                no_packing: bool = False) -> dict[str, Any]:
    import torch
    torch.set_num_threads(threads)
    from sgl.runtime.engine import Engine

    s = sizes(quick)
    eng = Engine(num_threads=threads, max_total_tokens=65536, show_progress=False, weight_format=fmt,
                 cpu_act_quant=act, disable_cpu_weight_packing=no_packing)
    res: dict[str, Any] = {"weight_format": eng.weight_format, "threads": threads, "cpu_act_quant": act,
                           "weight_packing": not no_packing}
    if eng.weight_format != fmt:
        eng.shutdown()
        return {"skipped": f"weight format {fmt} unavailable (auto resolved to {eng.weight_format})"}
    res["rss_after_load_mb"] = status_mb()
    tok = eng.tokenizer
    greedy = {"temperature": 0, "ignore_eos": True}
    eng.generate(text_of(8, 0), {"max_new_tokens": 8, **greedy})  # warm-up

    if 1 in rows:
        res["read_bw_gbs"] = read_bandwidth_gbs()
        prompt = tok.encode(text_of(80, 1))[:64]
        runs = []
        for _ in range(s["reps"]):
            eng.flush_cache()
            m = eng.generate(input_ids=prompt, sampling_params={"max_new_tokens": s["decode_new"], **greedy})["meta_info"]
            runs.append((m["completion_tokens"] - 1) / (m["e2e_latency"] - m["first_token_latency"]))
        res["decode_tps"] = statistics.median(runs)
        res["decode_cpu_ms_per_token"] = decode_cpu_ms(eng, prompt, greedy, s["reps"])
    if 2 in rows:
        ids = tok.encode(text_of(400, 2))[: s["prefill_len"]]
        assert len(ids) == s["prefill_len"], len(ids)
        runs = []
        for _ in range(s["reps"]):
            eng.flush_cache()
            t = time.perf_counter()
            eng.generate(input_ids=ids, sampling_params={"max_new_tokens": 1, **greedy})
            runs.append(len(ids) / (time.perf_counter() - t))
        res["prefill_tps"] = statistics.median(runs)
    if 3 in rows:
        prompts = [text_of(10 + i % 7, i) for i in range(s["b32_reqs"])]
        eng.flush_cache()
        t, c = time.perf_counter(), time.process_time()
        outs = eng.generate(prompts, {"max_new_tokens": s["b32_new"], **greedy})
        n = sum(o["meta_info"]["completion_tokens"] for o in outs)
        res["b32_tps"] = n / (time.perf_counter() - t)
        res["b32_tok_per_cpu_s"] = n / (time.process_time() - c)  # every thread of this process
    if 4 in rows:
        eng.flush_cache()
        t, c = time.perf_counter(), time.process_time()
        eng.generate(shared_prompts(s["shared_reqs"]), {"max_new_tokens": 32, **greedy})
        res["shared_total_s"] = time.perf_counter() - t  # cold cache: the first request computes the prefix
        res["shared_cpu_s"] = time.process_time() - c
    if 5 in rows:
        # NOTE: "unconstrained" runs every row json_new tokens in lockstep; a JSON row ends when its object
        # closes (46-71 tokens here), so at batch 8 its batch thins out at the end and its tok/s drops for
        # that alone. "same_len" is the same work unconstrained: each row's max_new_tokens = the JSON row's
        # count (ignore_eos), so the ratio json / same_len is the cost of constraining itself.
        schema = json.dumps(PERSON["schema"])
        for b in (1, 8):
            runs: dict[str, list[float]] = {"json": [], "same_len": [], "unconstrained": []}
            cpu_runs: dict[str, list[float]] = {k: [] for k in runs}  # tokens per CPU-second (all threads)
            for rep in range(s["reps"]):
                seeds = [100 * rep + i for i in range(b)]
                ps = [{"max_new_tokens": s["json_new"], "temperature": 1.0, "sampling_seed": x, "json_schema": schema}
                      for x in seeds]
                lens: list[int] = []
                for label in ("json", "same_len", "unconstrained"):
                    if label != "json":
                        ps = [{"max_new_tokens": n, "temperature": 1.0, "sampling_seed": x, "ignore_eos": True}
                              for x, n in zip(seeds, lens if label == "same_len" else [s["json_new"]] * b)]
                    eng.generate([PERSON["prompt"]] * b, ps)  # NOTE: warm: the prompt is cached, decode dominates
                    t, c = time.perf_counter(), time.process_time()
                    outs = eng.generate([PERSON["prompt"]] * b, ps)
                    dt, dc = time.perf_counter() - t, time.process_time() - c
                    if label == "json":
                        lens = [o["meta_info"]["completion_tokens"] for o in outs]
                    runs[label].append(sum(o["meta_info"]["completion_tokens"] for o in outs) / dt)
                    cpu_runs[label].append(sum(o["meta_info"]["completion_tokens"] for o in outs) / dc)
            res[f"json_b{b}"] = {k: statistics.median(v) for k, v in runs.items()}
            res[f"json_b{b}_per_cpu_s"] = {k: statistics.median(v) for k, v in cpu_runs.items()}
    res["rss_end_mb"] = status_mb()
    eng.check_integrity()
    eng.shutdown()
    return res


# ---- HF transformers fp32 (subprocess per thread count) ----------------------------------------
def worker_hf(threads: int, rows: list[int], quick: bool) -> dict[str, Any]:
    import torch
    torch.set_num_threads(threads)
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_offline import hf_model  # noqa: E402 - the same fp32 weights as our fp32 path

    from sgl.runtime.engine import Engine
    s = sizes(quick)
    eng = Engine(num_threads=threads, max_total_tokens=4096, show_progress=False, weight_format="fp32")
    model, tok = hf_model(eng), eng.tokenizer
    eng.shutdown()
    res: dict[str, Any] = {}
    with torch.inference_mode():
        if 1 in rows:
            ids = torch.tensor([tok.encode(text_of(80, 1))[:64]])
            runs = []
            for _ in range(s["reps"]):
                t = time.perf_counter()
                model.generate(ids, max_new_tokens=1, min_new_tokens=1, do_sample=False)
                t1 = time.perf_counter() - t
                t = time.perf_counter()
                model.generate(ids, max_new_tokens=s["decode_new"], min_new_tokens=s["decode_new"], do_sample=False)
                runs.append((s["decode_new"] - 1) / (time.perf_counter() - t - t1))
            res["decode_tps"] = statistics.median(runs)
        if 2 in rows:
            ids = torch.tensor([tok.encode(text_of(400, 2))[: s["prefill_len"]]])
            runs = []
            for _ in range(s["reps"]):
                t = time.perf_counter()
                model(input_ids=ids)
                runs.append(ids.shape[1] / (time.perf_counter() - t))
            res["prefill_tps"] = statistics.median(runs)
    return res


# ---- llama.cpp ------------------------------------------------------------------------------------
def llama_cpp_dir(arg: Optional[str]) -> tuple[Optional[Path], str]:
    """(folder with bin/llama-bench and bin/llama-server, or None, why not)."""
    if arg:
        d = Path(arg)
    else:  # the folder logic of ../shared/peers/llama_cpp.sh, without building
        d = Path(os.environ.get("HOME", "/root")) / ".cache/sgl-peers/llama.cpp"
    if (d / "bin/llama-bench").exists() and (d / "bin/llama-server").exists():
        return d, ""
    return None, f"llama.cpp not built at {d} (run {PEER_SCRIPT} to build it, 6-10 minutes)"


# llama.cpp's CPU "extra" buffer types (weight repacking, and AMX where the CPU flags it) are turned off: on
# this VM the CPU reports amx_int8 but AMX tile use crashes llama.cpp (SIGSEGV in ggml_backend_amx_mul_mat,
# before the first token). Off, Q4_1 runs ggml-cpu's AVX2 dot products (Q4_1 has no AVX2 repack anyway).
NO_EXTRA_BUFFERS_BENCH = ["--repack", "0"]
NO_EXTRA_BUFFERS_SERVER = ["--no-repack"]


def llama_bench(d: Path, gguf: str, threads: int, quick: bool) -> dict[str, float]:
    s = sizes(quick)
    cmd = [str(d / "bin/llama-bench"), "-m", gguf, "-t", str(threads), "-p", str(s["prefill_len"]),
           "-n", str(s["decode_new"]), "-r", str(s["reps"]), "-o", "json", *NO_EXTRA_BUFFERS_BENCH]
    out = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
    res = {}
    for r in out:
        key = "prefill_tps" if r.get("n_prompt", 0) > 0 else "decode_tps"
        res[key] = float(r["avg_ts"])
    return res


def llama_server(d: Path, gguf: str, threads: int, rows: list[int], quick: bool) -> dict[str, Any]:
    import httpx
    s = sizes(quick)
    port = free_port()
    parallel = 32
    ctx = parallel * 640  # every slot fits a ~600-token shared-prefix request
    proc = subprocess.Popen([str(d / "bin/llama-server"), "-m", gguf, "-t", str(threads), "-tb", str(threads),
                             "-c", str(ctx), "--parallel", str(parallel), "--host", "127.0.0.1", "--port", str(port),
                             *NO_EXTRA_BUFFERS_SERVER],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    res: dict[str, Any] = {}
    try:
        wait_healthy(url, proc, timeout=120, interval=0.5)

        def run(prompts: list[str], n_new: int, cache: bool) -> tuple[float, int]:
            def one(p: str) -> int:
                r = httpx.post(url + "/completion", json={"prompt": p, "n_predict": n_new, "temperature": 0,
                                                          "ignore_eos": True, "cache_prompt": cache}, timeout=3600)
                r.raise_for_status()
                return int(r.json()["tokens_predicted"])
            t = time.perf_counter()
            with ThreadPoolExecutor(len(prompts)) as ex:
                n = sum(ex.map(one, prompts))
            return time.perf_counter() - t, n

        run([text_of(8, 0)], 8, False)  # warm-up
        if 3 in rows:
            c = cpu_seconds(proc.pid)
            dt, n = run([text_of(10 + i % 7, i) for i in range(s["b32_reqs"])], s["b32_new"], False)
            res["b32_tps"] = n / dt
            res["b32_tok_per_cpu_s"] = n / (cpu_seconds(proc.pid) - c)
        if 4 in rows:
            qs = shared_prompts(s["shared_reqs"])
            # Warm every slot's prompt cache with the shared system prompt (llama-server caches per slot and
            # gives a request the idle slot whose cached prompt matches best): one concurrent request per slot.
            # (Warming with the whole workload cost 35K prefill tokens: past an hour at 1 thread under load.)
            res["warm_up_s"], _ = run([SYSTEM_PROMPT] * min(parallel, len(qs)), 1, True)
            c = cpu_seconds(proc.pid)
            res["shared_total_s"], _ = run(qs, 32, True)  # the workload, cache_prompt on, the prefix cached
            res["shared_cpu_s"] = cpu_seconds(proc.pid) - c
        res["rss_mb"] = status_mb(proc.pid)["VmRSS"]
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
    return res


# ---- driver -----------------------------------------------------------------------------------------
def _subprocess_json(args: list[str], threads: int) -> dict[str, Any]:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), OMP_WAIT_POLICY="PASSIVE", MKL_NUM_THREADS=str(threads))
    p = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=env)
    if p.returncode != 0:
        return {"error": p.stderr.strip().splitlines()[-1] if p.stderr.strip() else f"exit {p.returncode}"}
    return json.loads(p.stdout.strip().splitlines()[-1])


def ratio(a: Optional[float], b: Optional[float]) -> str:
    return f"{a / b:.2f}x" if a and b else "n/a"


def fmt(x: Optional[float], digits: int = 1) -> str:
    return f"{x:.{digits}f}" if isinstance(x, (int, float)) else "n/a"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--weight-formats", nargs="+", default=["fp32", "native"], choices=["fp32", "native"])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    ap.add_argument("--quick", action="store_true", help="small workloads, one repetition (a smoke run)")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--skip-llama-cpp", action="store_true")
    ap.add_argument("--llama-cpp-dir", default=None, help="folder with bin/llama-bench and bin/llama-server")
    ap.add_argument("--out", default=None, help="JSON path; a bare file name goes to benchmarks/results/ "
                    "(default bench_cpu[_quick].json)")
    ap.add_argument("--cpu-act-quant", default="q16", choices=["q16", "q8"], help="ours: the engine's activation mode")
    ap.add_argument("--disable-cpu-weight-packing", action="store_true", help="ours: no packed weight copies")
    ap.add_argument("--worker", nargs=2, metavar=("WHAT", "THREADS"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        what, threads = a.worker[0], int(a.worker[1])
        out = worker_hf(threads, a.rows, a.quick) if what == "hf" else worker_ours(
            what, threads, a.rows, a.quick, a.cpu_act_quant, a.disable_cpu_weight_packing)
        print(json.dumps(out))
        return

    gguf = gguf_path()
    q41_bytes = Path(gguf).stat().st_size  # every tensor is read once per token (tied embedding = lm_head)
    results: dict[str, Any] = {"gguf": gguf, "gguf_bytes": q41_bytes, "quick": a.quick, "rows": a.rows,
                               "cpu_act_quant": a.cpu_act_quant, "weight_packing": not a.disable_cpu_weight_packing,
                               "machine": {"cpus": os.cpu_count(), "load_avg_start": os.getloadavg()},
                               "ours": {}, "hf": {}, "llama_bench": {}, "llama_server": {}, "skipped": []}
    d, why = (None, "--skip-llama-cpp") if a.skip_llama_cpp else llama_cpp_dir(a.llama_cpp_dir)
    if d is None:
        results["skipped"].append(why)
        print(f"skipping llama.cpp: {why}", file=sys.stderr)
    common = (["--rows", *map(str, a.rows), "--cpu-act-quant", a.cpu_act_quant] + (["--quick"] if a.quick else [])
              + (["--disable-cpu-weight-packing"] if a.disable_cpu_weight_packing else []))
    t_start = time.perf_counter()
    for t in a.threads:
        for wf in a.weight_formats:
            print(f"ours {wf}, {t} thread(s) ...", file=sys.stderr, flush=True)
            r = _subprocess_json(["--worker", wf, str(t), *common], t)
            results["ours"][f"{wf}/{t}"] = r
            if "skipped" in r or "error" in r:
                results["skipped"].append(f"ours {wf}/{t}: {r.get('skipped') or r.get('error')}")
        if not a.skip_hf and {1, 2} & set(a.rows):
            print(f"HF fp32, {t} thread(s) ...", file=sys.stderr, flush=True)
            results["hf"][str(t)] = _subprocess_json(["--worker", "hf", str(t), *common], t)
        if d is not None:
            if {1, 2} & set(a.rows):
                print(f"llama-bench, {t} thread(s) ...", file=sys.stderr, flush=True)
                results["llama_bench"][str(t)] = _peer(lambda: llama_bench(d, gguf, t, a.quick), results)
                if 1 in a.rows and "error" not in results["llama_bench"][str(t)]:
                    results["llama_bench"][str(t)]["decode_cpu_ms_per_token"] = llama_bench_cpu_ms(
                        d, gguf, t, sizes(a.quick)["reps"])
            if {3, 4} & set(a.rows):
                print(f"llama-server, {t} thread(s) ...", file=sys.stderr, flush=True)
                results["llama_server"][str(t)] = _peer(lambda: llama_server(d, gguf, t, a.rows, a.quick), results)
        _write(results, a.quick, partial=True, out=a.out)  # a later failure keeps what was measured
    results["wall_s"] = time.perf_counter() - t_start
    results["machine"]["load_avg_end"] = os.getloadavg()

    table = build_table(results, a.threads, a.weight_formats, q41_bytes)
    results["table"] = table
    print(f"\nbench_cpu ({'quick, ' if a.quick else ''}threads {a.threads}, OMP_WAIT_POLICY=PASSIVE, ours "
          f"{a.cpu_act_quant}{'' if not a.disable_cpu_weight_packing else ', no packing'}; "
          f"load avg {results['machine']['load_avg_start'][0]:.1f} -> {results['machine']['load_avg_end'][0]:.1f})")
    for line in table:
        print(line)
    for s in results["skipped"]:
        print(f"skipped: {s}")
    print(f"wrote {_write(results, a.quick, partial=False, out=a.out)}", file=sys.stderr)


def _peer(run: Any, results: dict[str, Any]) -> dict[str, Any]:
    """A peer's measurement, or {"error": ...} (a crashed or timed-out peer must not lose ours)."""
    try:
        return run()
    except Exception as e:  # noqa: BLE001 - reported in the JSON and the table's skipped lines
        results["skipped"].append(f"peer failed: {type(e).__name__}: {e}")
        return {"error": f"{type(e).__name__}: {e}"}


def _write(results: dict[str, Any], quick: bool, partial: bool, out: Optional[str] = None) -> Path:
    out_dir = ROOT / "benchmarks" / "results"
    out_dir.mkdir(exist_ok=True)
    path = out_dir / f"bench_cpu{'_quick' if quick else ''}.json"
    if out:
        path = Path(out) if Path(out).parent != Path(".") else out_dir / out
    path.write_text(json.dumps({**results, "partial": partial}, indent=2))
    return path


def build_table(r: dict[str, Any], threads: list[int], formats: list[str], q41_bytes: int) -> list[str]:
    lines = ["| row | threads | ours " + " | ours ".join(formats) + " | llama.cpp | HF fp32 | ratio ours/llama.cpp |",
             "|---|---|" + "---|" * len(formats) + "---|---|---|"]

    def ours(t: int, key: str) -> list[Optional[float]]:
        return [r["ours"].get(f"{wf}/{t}", {}).get(key) for wf in formats]

    def add(name: str, t: int, vals: list[Optional[float]], peer: Optional[float], hf: Optional[float],
            lower_better: bool = False, extra: str = "") -> None:
        rs = [ratio(peer, v) if lower_better else ratio(v, peer) for v in vals]
        lines.append(f"| {name} | {t} | " + " | ".join(fmt(v) for v in vals) + f" | {fmt(peer)} | {fmt(hf)} | "
                     + " / ".join(rs) + (f"{extra}" if extra else "") + " |")

    for t in threads:
        lb, ls, hf = r["llama_bench"].get(str(t), {}), r["llama_server"].get(str(t), {}), r["hf"].get(str(t), {})
        if 1 in r["rows"]:
            vals = ours(t, "decode_tps")
            bws = [v for v in ours(t, "read_bw_gbs") if v]
            floor = (statistics.median(bws) * 1e9 / q41_bytes) if bws else None
            fr = " / ".join(f"{v / floor:.0%}" if v and floor else "n/a" for v in vals)
            add("1 decode tok/s (b1, 64+128)", t, vals, lb.get("decode_tps"), hf.get("decode_tps"),
                extra=f"; of Q4_1 floor {fmt(floor)} tok/s: {fr}")
            cpu = ours(t, "decode_cpu_ms_per_token")
            add("1b decode CPU ms/token (lower better)", t, cpu, lb.get("decode_cpu_ms_per_token"), None,
                lower_better=True, extra=" (llama.cpp/ours)")
        if 2 in r["rows"]:
            add("2 prefill tok/s (512)", t, ours(t, "prefill_tps"), lb.get("prefill_tps"), hf.get("prefill_tps"))
        if 3 in r["rows"]:
            add("3 32 x 128 output tok/s", t, ours(t, "b32_tps"), ls.get("b32_tps"), None)
            add("3 32 x 128 output tok per CPU-second", t, ours(t, "b32_tok_per_cpu_s"), ls.get("b32_tok_per_cpu_s"),
                None)
        if 4 in r["rows"]:
            add("4 shared prefix total s (lower better)", t, ours(t, "shared_total_s"), ls.get("shared_total_s"),
                None, lower_better=True, extra=" (llama.cpp/ours)")
            add("4 shared prefix CPU s (lower better)", t, ours(t, "shared_cpu_s"), ls.get("shared_cpu_s"),
                None, lower_better=True, extra=" (llama.cpp/ours)")
        if 5 in r["rows"]:
            for b in (1, 8):
                js = ours(t, f"json_b{b}")
                cells = [f"{j['json']:.1f} vs {j['unconstrained']:.1f} ({j['json'] / j['unconstrained']:.2f}x)"
                         + (f"; same lengths {j['same_len']:.1f} ({j['json'] / j['same_len']:.2f}x)" if "same_len" in j else "")
                         if j else "n/a" for j in js]
                lines.append(f"| 5 JSON vs free tok/s, batch {b} | {t} | " + " | ".join(cells) + " | - | - | - |")
                cs = ours(t, f"json_b{b}_per_cpu_s")
                if any(cs):
                    cells = [f"{j['json']:.1f} vs {j['unconstrained']:.1f} ({j['json'] / j['unconstrained']:.2f}x); "
                             f"same lengths {j['same_len']:.1f} ({j['json'] / j['same_len']:.2f}x)" if j else "n/a" for j in cs]
                    lines.append(f"| 5 JSON vs free tokens per CPU-s, batch {b} | {t} | " + " | ".join(cells) + " | - | - | - |")
    for t in threads:
        rss = [r["ours"].get(f"{wf}/{t}", {}).get("rss_end_mb", {}) for wf in formats]
        ls = r["llama_server"].get(str(t), {})
        lines.append(f"| RSS MB (end / peak) | {t} | " + " | ".join(
            f"{x.get('VmRSS', float('nan')):.0f} / {x.get('VmHWM', float('nan')):.0f}" if x else "n/a" for x in rss)
            + f" | {fmt(ls.get('rss_mb'), 0)} (server) | - | - |")
    return lines


if __name__ == "__main__":
    main()

"""Online serving benchmark, like SGLang's `bench_serving`: Poisson arrivals at given request rates
against any OpenAI-compatible server (or SGLang's native /generate), reporting request throughput,
output tokens/s, TTFT and inter-token latency percentiles, with a PNG of latency vs request rate.

    # start our server, run three rates, stop it (CPU: keep it small)
    python benchmarks/bench_serving.py --launch --num-threads 2 --request-rates 0.5,1,2,inf --num-prompts 32

    # any running OpenAI-compatible server (ours, SGLang's, vLLM's, ...)
    python benchmarks/bench_serving.py --base-url http://127.0.0.1:30000 --model default --dataset shared-prefix

Prompts are built from common English words (about one token each), so the same run can target a
peer server without our tokenizer; the real token counts come back in each response's usage.
Writes benchmarks/results/bench_serving_<dataset>.json and .png.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import httpx

from sgl.runtime.processes import start_healthy_server

RESULTS = Path(__file__).resolve().parent / "results"
WORDS = ("time year people way day man thing woman life child world school state family student group country "
         "problem hand part place case week company system program question work government number night "
         "point home water room mother area money story fact month lot right study book eye job word business "
         "issue side kind head house service friend father power hour game line end member law car city "
         "community name president team minute idea kid body information back parent face others level office "
         "door health person art war history party result change morning reason research girl guy moment air "
         "teacher force education").split()


@dataclass
class Prompt:
    text: str
    output_len: int


@dataclass
class Outcome:
    ok: bool
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    latency: float = 0.0
    itls: list[float] = field(default_factory=list)
    error: str = ""


def random_words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def make_prompts(args: argparse.Namespace) -> list[Prompt]:
    """random: input/output lengths uniform in [len * range_ratio, len]; shared-prefix: `num_groups`
    system prompts of `shared_prefix_len` words, each followed by a short question."""
    rng = random.Random(args.seed)

    def length(full: int) -> int:
        return max(1, rng.randint(int(full * args.range_ratio), full))

    if args.dataset == "random":
        return [Prompt(random_words(rng, length(args.input_len)), length(args.output_len))
                for _ in range(args.num_prompts)]
    prefixes = [f"System {g}: " + random_words(rng, args.shared_prefix_len) for g in range(args.num_groups)]
    return [Prompt(f"{prefixes[i % args.num_groups]}\nQuestion: {random_words(rng, length(args.input_len))}?",
                   length(args.output_len)) for i in range(args.num_prompts)]


def _request(args: argparse.Namespace, p: Prompt) -> tuple[str, dict[str, Any]]:
    if args.backend == "sglang":
        return "/generate", {"text": p.text, "stream": True, "sampling_params": {
            "max_new_tokens": p.output_len, "temperature": args.temperature, "ignore_eos": not args.allow_eos}}
    body: dict[str, Any] = {"model": args.model, "prompt": p.text, "max_tokens": p.output_len, "stream": True,
                            "temperature": args.temperature, "stream_options": {"include_usage": True}}
    if not args.allow_eos:
        body["ignore_eos"] = True  # SGLang/vLLM extra field: fixed output lengths
    return "/v1/completions", body


async def send(client: httpx.AsyncClient, args: argparse.Namespace, p: Prompt) -> Outcome:
    """One streaming request; TTFT at the first content, ITL between later token arrivals."""
    path, body = _request(args, p)
    out = Outcome(ok=False)
    t0 = time.perf_counter()
    last = t0
    tokens = 0
    try:
        async with client.stream("POST", path, json=body) as r:
            if r.status_code != 200:
                out.error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                return out
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    out.error = str(chunk["error"])
                    return out
                now = time.perf_counter()
                if args.backend == "sglang":
                    meta = chunk["meta_info"]
                    new = int(meta["completion_tokens"]) - tokens
                    out.prompt_tokens = int(meta["prompt_tokens"])
                else:
                    if chunk.get("usage"):
                        out.prompt_tokens = chunk["usage"]["prompt_tokens"]
                        tokens = chunk["usage"]["completion_tokens"]
                    new = 1 if chunk.get("choices") and chunk["choices"][0].get("text") else 0
                if new <= 0:
                    continue
                if tokens == 0 and not out.ttft:
                    out.ttft = now - t0
                else:
                    out.itls.extend([(now - last) / new] * new)
                tokens += new
                last = now
        out.latency = time.perf_counter() - t0
        out.output_tokens = tokens
        out.ok = tokens > 0
        if not out.ok:
            out.error = "no tokens"
    except (httpx.HTTPError, json.JSONDecodeError, KeyError) as exc:
        out.error = f"{type(exc).__name__}: {exc}"
    return out


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    k = (len(s) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def summarize(rate: float, outs: list[Outcome], duration: float) -> dict[str, Any]:
    ok = [o for o in outs if o.ok]
    ttfts = [o.ttft * 1000 for o in ok]
    itls = [x * 1000 for o in ok for x in o.itls]
    e2e = [o.latency * 1000 for o in ok]
    out_tokens = sum(o.output_tokens for o in ok)
    res: dict[str, Any] = {
        "request_rate": "inf" if math.isinf(rate) else rate, "completed": len(ok), "failed": len(outs) - len(ok),
        "duration_s": duration, "request_throughput": len(ok) / duration,
        "input_tokens": sum(o.prompt_tokens for o in ok), "output_tokens": out_tokens,
        "output_throughput": out_tokens / duration,
        "total_token_throughput": (out_tokens + sum(o.prompt_tokens for o in ok)) / duration,
    }
    for name, vals in (("ttft_ms", ttfts), ("itl_ms", itls), ("e2e_latency_ms", e2e)):
        res[f"mean_{name}"] = statistics.fmean(vals) if vals else float("nan")
        for q in (50, 90, 99):
            res[f"p{q}_{name}"] = pct(vals, q)
    if len(outs) > len(ok):
        res["first_error"] = next(o.error for o in outs if not o.ok)
    return res


async def run_rate(args: argparse.Namespace, prompts: list[Prompt], rate: float) -> dict[str, Any]:
    rng = random.Random(args.seed + 1)
    limits = httpx.Limits(max_connections=args.max_concurrency or len(prompts) + 8)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    sem = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else None
    async with httpx.AsyncClient(base_url=args.base_url, limits=limits, headers=headers,
                                 timeout=httpx.Timeout(args.timeout)) as client:
        await send(client, args, Prompt("Warm up", 2))

        async def guarded(p: Prompt) -> Outcome:
            if sem is None:
                return await send(client, args, p)
            async with sem:
                return await send(client, args, p)

        tasks = []
        t0 = time.perf_counter()
        for p in prompts:
            tasks.append(asyncio.create_task(guarded(p)))
            if not math.isinf(rate):
                await asyncio.sleep(rng.expovariate(rate))  # Poisson process: exponential gaps
        outs = await asyncio.gather(*tasks)
        return summarize(rate, list(outs), time.perf_counter() - t0)


def plot(results: list[dict[str, Any]], path: Path, title: str) -> Optional[Path]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)", file=sys.stderr)
        return None
    labels = [str(r["request_rate"]) for r in results]
    x = list(range(len(results)))
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for ax, key, name in zip(axes, ("ttft_ms", "itl_ms", "e2e_latency_ms"),
                             ("time to first token", "inter-token latency", "end-to-end latency")):
        for q, style in ((50, "o-"), (90, "s--"), (99, "^:")):
            ax.plot(x, [r[f"p{q}_{key}"] for r in results], style, label=f"p{q}")
        ax.set_xticks(x, labels)
        ax.set_xlabel("request rate (req/s)")
        ax.set_ylabel("ms")
        ax.set_title(name)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def launch(args: argparse.Namespace) -> subprocess.Popen:
    """Start our server on a free loopback port; sets args.base_url."""
    proc, args.base_url = start_healthy_server(["--model-path", args.model_path, "--log-level", "warning",
                                                *args.server_args], args.num_threads or None)
    return proc


def print_table(results: list[dict[str, Any]]) -> None:
    cols = [("rate", "request_rate", "{}"), ("ok", "completed", "{}"), ("req/s", "request_throughput", "{:.2f}"),
            ("out tok/s", "output_throughput", "{:.1f}"), ("TTFT p50", "p50_ttft_ms", "{:.0f}"),
            ("TTFT p90", "p90_ttft_ms", "{:.0f}"), ("TTFT p99", "p99_ttft_ms", "{:.0f}"),
            ("ITL p50", "p50_itl_ms", "{:.1f}"), ("ITL p90", "p90_itl_ms", "{:.1f}"),
            ("ITL p99", "p99_itl_ms", "{:.1f}"), ("E2E p50", "p50_e2e_latency_ms", "{:.0f}")]
    print("  ".join(f"{c[0]:>9}" for c in cols) + "   (latencies in ms)")
    for r in results:
        print("  ".join(f"{c[2].format(r[c[1]]):>9}" for c in cols))


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", default="http://127.0.0.1:30000")
    p.add_argument("--backend", choices=("openai", "sglang"), default="openai",
                   help="openai: /v1/completions (any compatible server); sglang: native /generate")
    p.add_argument("--model", default="default", help="the model name sent to an OpenAI-compatible server")
    p.add_argument("--api-key", default=None)
    p.add_argument("--dataset", choices=("random", "shared-prefix"), default="random")
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--input-len", type=int, default=64, help="prompt words (random) / question words (shared)")
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--range-ratio", type=float, default=0.5, help="lengths are uniform in [len*ratio, len]")
    p.add_argument("--shared-prefix-len", type=int, default=256)
    p.add_argument("--num-groups", type=int, default=4)
    p.add_argument("--request-rates", default="1,2,4,inf", help="comma-separated req/s; inf = all at once")
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--allow-eos", action="store_true", help="do not send ignore_eos (outputs may end early)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--launch", action="store_true", help="start our server for the run, stop it after")
    p.add_argument("--model-path", default="default")
    p.add_argument("--num-threads", type=int, default=None)
    p.add_argument("--server-args", nargs=argparse.REMAINDER, default=[], help="extra flags for the server")
    p.add_argument("--output-dir", default=str(RESULTS))
    p.add_argument("--tag", default="", help="suffix for the result file names")
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    rates = [float(r) for r in args.request_rates.split(",")]
    proc = launch(args) if args.launch else None
    try:
        prompts = make_prompts(args)
        results = []
        for rate in rates:
            res = asyncio.run(run_rate(args, prompts, rate))
            results.append(res)
            print(f"rate {res['request_rate']}: {res['completed']} ok, {res['request_throughput']:.2f} req/s, "
                  f"{res['output_throughput']:.1f} out tok/s, TTFT p50 {res['p50_ttft_ms']:.0f} ms, "
                  f"ITL p50 {res['p50_itl_ms']:.1f} ms", flush=True)
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
    print_table(results)
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"bench_serving_{args.dataset}{'_' + args.tag if args.tag else ''}"
    config = {k: v for k, v in vars(args).items() if k not in ("api_key",)}
    host = {"cpus": os.cpu_count(), "python": sys.version.split()[0], "load_avg_1m": os.getloadavg()[0]}
    record = {"config": config, "host": host,
              "timestamp": time.strftime("%Y-%m-%d %H:%M:%S"), "results": results}
    (out_dir / f"{stem}.json").write_text(json.dumps(record, indent=2))
    png = plot(results, out_dir / f"{stem}.png",
               f"{args.dataset} prompts, {args.num_prompts} requests, {args.backend} API at {args.base_url}")
    print(f"wrote {out_dir / (stem + '.json')}" + (f" and {png}" if png else ""))
    failed = sum(r["failed"] for r in results)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

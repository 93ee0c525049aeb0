"""DSL programs vs plain sequential /generate calls, on the default model.

Two workloads, each run three ways in the same process:
  - extraction: the JSON-schema extraction job (examples/json_extraction_job.py) over N documents;
  - agent: the fork/join agent (examples/fork_join_agent.py) over M questions.
Ways:
  - dsl-inproc: the DSL on `sgl.Runtime` (in-process engine), `run_batch`;
  - dsl-http:   the DSL on `sgl.RuntimeEndpoint` against `python -m sgl.launch_server`, `run_batch`;
  - baseline:   the same prompts as plain sequential `/generate` calls (one request at a time, select
                scored one choice per request) against a server started with --disable-radix-cache.
Reported per (workload, way): wall time, programs/s, generated tokens/s, and the fraction of prompt
tokens served from the prefix cache.

    python benchmarks/bench_programs.py                       # 200 documents, 50 agents
    python benchmarks/bench_programs.py --docs 20 --agents 5 --ways dsl-inproc,baseline
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Callable

import httpx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples"))
sys.path.insert(0, os.path.join(ROOT, "tests", "e2e"))

import sgl  # noqa: E402
from fork_join_agent import STEPS, TOOLS, agent, questions  # noqa: E402
from json_extraction_job import DEFAULT_INPUT, SCHEMA, extract, is_valid  # noqa: E402

GREEDY = {"temperature": 0}


# ---- the baseline: the same programs as plain sequential /generate calls -----------------------
class Plain:
    """Sequential native calls with token accounting; prompts rendered with the server's template."""

    def __init__(self, url: str) -> None:
        self.client = httpx.Client(base_url=url, timeout=None)
        info = self.client.get("/get_model_info").json()
        self.template = sgl.ChatTemplate.from_jinja(info["chat_template"])
        self.prompt_tokens = self.cached_tokens = self.completion_tokens = 0

    def render(self, messages: list[dict[str, str]]) -> str:
        """Messages + an open assistant turn, exactly as the DSL renders them."""
        text, hist = "", []
        for m in messages:
            text += self.template.role_prefix(m["role"], hist) + m["content"] + self.template.role_suffix(m["role"], hist)
            hist.append(m)
        return text + self.template.role_prefix("assistant", hist)

    def generate(self, text: str, **body: Any) -> dict[str, Any]:
        r = self.client.post("/generate", json={"text": text, **body})
        r.raise_for_status()
        out = r.json()
        mi = out["meta_info"]
        self.prompt_tokens += mi["prompt_tokens"]
        self.cached_tokens += mi.get("cached_tokens", 0)
        self.completion_tokens += mi["completion_tokens"]
        return out

    def gen(self, messages: list[dict[str, str]], **sp: Any) -> str:
        sp = {"temperature": 0, "stop": ["<|im_end|>"], **sp}
        return self.generate(self.render(messages), sampling_params=sp)["text"]

    def select(self, messages: list[dict[str, str]], choices: list[str]) -> str:
        prompt = self.render(messages)
        n = self.generate(prompt, sampling_params={"max_new_tokens": 0})["meta_info"]["prompt_tokens"]
        scores = []
        for c in choices:  # one request per choice, as a hand-written client would
            lps = self.generate(prompt + c, sampling_params={"max_new_tokens": 0}, return_logprob=True,
                                logprob_start_len=max(n - 1, 0))["meta_info"]["input_token_logprobs"]
            vals = [t[0] for t in lps if t[0] is not None]
            scores.append(sum(vals) / max(len(vals), 1))
        return choices[scores.index(max(scores))]


def plain_extract(p: Plain, line: str) -> str:
    msgs = [{"role": "system", "content": "You extract facts about a person as JSON with keys name, occupation, "
                                          "city and born (the birth year). Use only facts stated in the text."},
            {"role": "user", "content": line}]
    return p.gen(msgs, max_new_tokens=64, json_schema=json.dumps(SCHEMA))


def plain_agent(p: Plain, question: str) -> str:
    msgs = [{"role": "system", "content": "You are a careful research assistant. Keep every answer to one short sentence."},
            {"role": "user", "content": f"Question: {question}\nWrite a three-step plan to answer it."}]
    msgs.append({"role": "assistant", "content": p.gen(msgs, max_new_tokens=40)})
    found = []
    for i in range(STEPS):
        m = msgs + [{"role": "user", "content": f"Carry out step {i + 1}. Which tool do you use: search, calculator or notes?"}]
        tool = p.select(m, TOOLS)
        m += [{"role": "assistant", "content": tool}, {"role": "user", "content": "Report what you found in one sentence."}]
        found.append((tool, p.gen(m, max_new_tokens=24, stop=["\n", "<|im_end|>"])))
    msgs.append({"role": "user", "content": "Findings:\n" + "".join(f"- ({t}) {f}\n" for t, f in found)
                 + "Answer the question in one sentence."})
    return p.gen(msgs, max_new_tokens=32)


# ---- running ----------------------------------------------------------------------------------
def measure(fn: Callable[[], Any], stats: Callable[[], tuple[int, int, int]], n: int) -> dict[str, Any]:
    p0, c0, g0 = stats()
    t0 = time.monotonic()
    result = fn()
    dt = time.monotonic() - t0
    p1, c1, g1 = stats()
    prompt, cached, gen = p1 - p0, c1 - c0, g1 - g0
    return {"programs": n, "seconds": round(dt, 2), "programs_per_s": round(n / dt, 3),
            "generated_tokens": gen, "tokens_per_s": round(gen / dt, 1), "prompt_tokens": prompt,
            "cached_tokens": cached, "cache_hit_rate": round(cached / prompt, 3) if prompt else 0.0,
            "_result": result}


def run_dsl(backend: Any, docs: list[str], qs: list[str]) -> dict[str, Any]:
    def stats() -> tuple[int, int, int]:
        s = backend.stats
        return s.prompt_tokens, s.cached_tokens, s.completion_tokens

    # warm up (first-call costs: thread pools, the schema's grammar compile), then start cold-cache
    extract.run(line=docs[0] if docs else "Ada Lovelace was born in London in 1815.", backend=backend, **GREEDY)
    if qs:
        agent.run(question="warm up", backend=backend, **GREEDY)
    out = {}
    if docs:
        backend.flush_cache()
        out["extraction"] = measure(lambda: extract.run_batch([{"line": d} for d in docs], backend=backend,
                                                              progress_bar=True, **GREEDY), stats, len(docs))
        out["extraction"]["valid"] = sum(is_valid(st["record"])[0] for st in out["extraction"].pop("_result"))
    if qs:
        backend.flush_cache()
        out["agent"] = measure(lambda: agent.run_batch([{"question": q} for q in qs], backend=backend,
                                                       progress_bar=True, **GREEDY), stats, len(qs))
        out["agent"].pop("_result")
    return out


def run_plain(url: str, docs: list[str], qs: list[str]) -> dict[str, Any]:
    p = Plain(url)

    def stats() -> tuple[int, int, int]:
        return p.prompt_tokens, p.cached_tokens, p.completion_tokens

    plain_extract(p, docs[0] if docs else "Ada Lovelace was born in London in 1815.")  # warm up
    if qs:
        plain_agent(p, "warm up")
    out = {}
    if docs:
        out["extraction"] = measure(lambda: [plain_extract(p, d) for d in docs], stats, len(docs))
        out["extraction"]["valid"] = sum(is_valid(t)[0] for t in out["extraction"].pop("_result"))
    if qs:
        out["agent"] = measure(lambda: [plain_agent(p, q) for q in qs], stats, len(qs))
        out["agent"].pop("_result")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", type=int, default=200)
    ap.add_argument("--agents", type=int, default=50)
    ap.add_argument("--ways", default="dsl-inproc,dsl-http,baseline")
    ap.add_argument("--num-threads", type=int, default=1, help="torch threads, the same for every way")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "bench_programs.json"))
    args = ap.parse_args(argv)

    from server_helpers import running_server  # the e2e tests' launcher: a free port, a log file

    with open(DEFAULT_INPUT) as f:
        lines = [ln.strip() for ln in f if ln.strip()]
    docs = [lines[i % len(lines)] for i in range(args.docs)]
    qs = questions(args.agents)
    ways = args.ways.split(",")
    # NOTE: the servers get tests/e2e/server_helpers' BASE_ARGS (a 16384-token KV pool); so does the engine.
    threads = ["--num-threads", str(args.num_threads)]
    results: dict[str, Any] = {"docs": args.docs, "agents": args.agents, "ways": {}}

    if "dsl-inproc" in ways:
        rt = sgl.Runtime(model_path="default", show_progress=False, num_threads=args.num_threads,
                         max_total_tokens=16384)
        try:
            results["ways"]["dsl-inproc"] = run_dsl(rt, docs, qs)
        finally:
            rt.shutdown()
        print(json.dumps(results["ways"]["dsl-inproc"]), flush=True)
    if "dsl-http" in ways:
        with running_server(*threads) as server:
            ep = sgl.RuntimeEndpoint(server.url)
            results["ways"]["dsl-http"] = run_dsl(ep, docs, qs)
            ep.shutdown()
        print(json.dumps(results["ways"]["dsl-http"]), flush=True)
    if "baseline" in ways:
        with running_server("--disable-radix-cache", *threads) as server:
            results["ways"]["baseline"] = run_plain(server.url, docs, qs)
        print(json.dumps(results["ways"]["baseline"]), flush=True)

    base = results["ways"].get("baseline", {})
    for way, res in results["ways"].items():
        for wl, r in res.items():
            if way != "baseline" and wl in base:
                r["speedup_vs_baseline"] = round(base[wl]["seconds"] / r["seconds"], 2)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    print(f"\n{'workload':<11} {'way':<11} {'programs':>8} {'seconds':>8} {'prog/s':>7} {'tok/s':>7} "
          f"{'cache hit':>9} {'speedup':>7}")
    for way, res in results["ways"].items():
        for wl, r in res.items():
            print(f"{wl:<11} {way:<11} {r['programs']:>8} {r['seconds']:>8.1f} {r['programs_per_s']:>7.2f} "
                  f"{r['tokens_per_s']:>7.1f} {r['cache_hit_rate']:>9.0%} {r.get('speedup_vs_baseline', ''):>7}")
    print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

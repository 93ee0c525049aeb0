"""Where a batch-1 speculative step spends its time (issue 9's profile), on the default model.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/profile_speculative_step.py [--threads 1]
        [--algorithm NGRAM] [--workload a] [--docs 1] [--num-draft-tokens 4]

Runs workload (a) (copy extraction, bench_speculative.py's prompts), (b) (chat) or (c) (json_schema) through an Engine and
times every phase of each scheduler step by wrapping the functions the step calls (each wrapper adds
~1 us per call): drafting, the rest of scheduling, the ForwardBatch build, the forward (split into
its linears, attention, norms, RoPE, KV store and the rest), the lm_head, sampling/acceptance, the
scheduler's processing of the results (KV trim, append, detokenize, stop checks) and the rest of
the step. Steps are split by kind: verify steps (a row with drafts), plain decode steps, prefill
steps. Times are the scheduler thread's CPU time (time.thread_time: with 1 thread every kernel runs on
it), so other processes on a shared machine inflate them less than wall time. Prints ms per step of
each phase and the load average. `--json PATH` writes the table.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_speculative import chat, engine_kwargs, workloads  # noqa: E402

import sgl.runtime.executor.model_runner as model_runner  # noqa: E402
import sgl.runtime.models.llama as llama  # noqa: E402
from sgl.runtime.engine import Engine  # noqa: E402

FORWARD_PARTS = ("linear", "attention", "rms_norm", "kv store", "rope")


class Phases:
    """Per step kind, seconds per phase; one step's phases are collected, then filed under its kind."""

    def __init__(self) -> None:
        self.totals: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        self.steps: collections.Counter = collections.Counter()
        self.tokens: collections.Counter = collections.Counter()  # tokens produced per step kind
        self.cur: collections.Counter = collections.Counter()
        self.kind = "idle"

    def wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*a: Any, **kw: Any) -> Any:
            t0 = time.thread_time()
            try:
                return fn(*a, **kw)
            finally:
                self.cur[name] += time.thread_time() - t0
        return timed


def instrument(eng: Engine, ph: Phases) -> None:
    sch = eng.scheduler
    runner = sch.runner
    model = runner.model
    if sch.spec is not None:
        sch.spec.drafts = ph.wrap("draft", sch.spec.drafts)
    sch._schedule = ph.wrap("schedule", sch._schedule)
    sch._process = ph.wrap("process results", sch._process)

    class FB:  # model_runner reads ForwardBatch.from_lists only
        from_lists = staticmethod(ph.wrap("batch build", model_runner.ForwardBatch.from_lists))

    model_runner.ForwardBatch = FB
    model.forward = ph.wrap("forward", model.forward)
    compute_logits = ph.wrap("lm_head", model.compute_logits)

    def lm_head(hidden: Any) -> Any:  # its linear is the lm_head's, not the forward's
        before = ph.cur["linear"]
        out = compute_logits(hidden)
        ph.cur["linear"] = before
        return out

    model.compute_logits = lm_head
    model_runner.sample_verify = ph.wrap("sample + accept", model_runner.sample_verify)
    llama.linear = ph.wrap("linear", llama.linear)
    llama.paged_attention = ph.wrap("attention", llama.paged_attention)
    llama.rms_norm = ph.wrap("rms_norm", llama.rms_norm)
    kv = runner.kv
    kv.store = ph.wrap("kv store", kv.store)
    model.rope.apply = ph.wrap("rope", model.rope.apply)
    run = runner.run

    def run_and_classify(batch: Any) -> Any:
        rows = batch.rows
        if any(r.draft_len for r in rows):
            ph.kind = "verify"
        elif all(r.extend_len == 1 for r in rows):
            ph.kind = "decode"
        else:
            ph.kind = "prefill"
        out = run(batch)
        ph.tokens[ph.kind] += sum((r.token_id is not None) + len(r.next_token_ids) for r in out)
        return out

    runner.run = ph.wrap("runner.run", run_and_classify)
    step = sch.step

    def timed_step() -> None:
        ph.cur.clear()
        ph.kind = "idle"
        t0 = time.thread_time()
        step()
        ph.cur["step"] += time.thread_time() - t0
        ph.totals[ph.kind].update(ph.cur)
        ph.steps[ph.kind] += 1

    sch.step = timed_step


def table(ph: Phases) -> list[dict[str, Any]]:
    rows = []
    for kind in ("verify", "decode", "prefill"):
        n = ph.steps[kind]
        if not n:
            continue
        t = {k: v / n * 1e3 for k, v in ph.totals[kind].items()}  # ms per step
        fwd_parts = {p: t.get(p, 0.0) for p in FORWARD_PARTS}
        out = {
            "draft": t.get("draft", 0.0),
            "schedule (rest)": t.get("schedule", 0.0) - t.get("draft", 0.0),
            "batch build": t.get("batch build", 0.0),
            **{f"forward: {p}": v for p, v in fwd_parts.items()},
            "forward: rest": t.get("forward", 0.0) - sum(fwd_parts.values()),
            "lm_head": t.get("lm_head", 0.0),
            "sample + accept": t.get("sample + accept", 0.0),
            "runner (rest)": t.get("runner.run", 0.0) - sum(t.get(k, 0.0) for k in (
                "batch build", "forward", "lm_head", "sample + accept")),
            "process results": t.get("process results", 0.0),
        }
        out["step (rest)"] = t.get("step", 0.0) - sum(t.get(k, 0.0) for k in ("schedule", "runner.run", "process results"))
        out["step"] = t.get("step", 0.0)
        rows.append({"kind": kind, "steps": n, "tokens_per_step": ph.tokens[kind] / n,
                     "ms_per_token": t.get("step", 0.0) * n / max(1, ph.tokens[kind]), "ms": out})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--algorithm", default="NGRAM", help="NGRAM, EAGLE, MEDUSA, ... or none")
    ap.add_argument("--workload", default="a", choices=["a", "b", "c"])
    ap.add_argument("--docs", type=int, default=1, help="prompts of the workload to run")
    ap.add_argument("--num-draft-tokens", type=int, default=4)
    ap.add_argument("--json", default=None)
    ap.add_argument("--always-draft", action="store_true", help="every decoding row drafts (no adaptive rule)")
    ap.add_argument("--cpu-act-quant", default=None, help="the engine's --cpu-act-quant (default: its default, q16)")
    ap.add_argument("--fold-max-rows", type=int, default=None,
                    help="A/B: sgl.kernels.attention.FOLD_MAX_ROWS (0: every extend takes the enable_gqa bool-mask path)")
    a = ap.parse_args()
    if a.fold_max_rows is not None:
        import sgl.kernels.attention as attention

        attention.FOLD_MAX_ROWS = a.fold_max_rows
    load = os.getloadavg()
    algo = None if a.algorithm == "none" else a.algorithm
    kw = engine_kwargs(algo, a.threads, None, a.num_draft_tokens, act_quant=a.cpu_act_quant)
    if a.always_draft and algo is not None:
        kw["speculative_always_draft"] = True
    eng = Engine(**kw)
    try:
        eng.generate(chat("Hello"), {"max_new_tokens": 8, "temperature": 0})  # warm-up, not profiled
        ph = Phases()
        instrument(eng, ph)
        name = {"a": "a_copy_extraction", "b": "b_chat", "c": "c_schema"}[a.workload]
        prompts, params, _ = workloads(False)[name]
        t0 = time.perf_counter()
        tokens = 0
        for p in prompts[: a.docs]:
            tokens += eng.generate(p, params)["meta_info"]["completion_tokens"]
        wall = time.perf_counter() - t0
        eng.wait_idle()
        eng.check_integrity()
    finally:
        eng.shutdown()
    rows = table(ph)
    print(f"{a.algorithm} on ({a.workload}), {a.docs} prompt(s), {a.threads} thread(s): {tokens} tokens in "
          f"{wall:.2f} s = {tokens / wall:.1f} tok/s; load average {load[0]:.1f} before / {os.getloadavg()[0]:.1f} after")
    phases = list(rows[0]["ms"]) if rows else []
    print("| phase (ms per step) | " + " | ".join(f"{r['kind']} ({r['steps']} steps)" for r in rows) + " |")
    print("|---|" + "---|" * len(rows))
    for p in phases:
        print(f"| {p} | " + " | ".join(f"{r['ms'][p]:.2f}" for r in rows) + " |")
    print("| tokens per step | " + " | ".join(f"{r['tokens_per_step']:.2f}" for r in rows) + " |")
    print("| ms per token | " + " | ".join(f"{r['ms_per_token']:.2f}" for r in rows) + " |")
    if a.json:
        Path(a.json).write_text(json.dumps({"args": vars(a), "load": [load[0], os.getloadavg()[0]],
                                            "tok_s": tokens / wall, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()

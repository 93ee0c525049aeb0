"""On-model coverage: JSONSchemaBench schemas through ONE Engine on the default model, greedy, at most 512
new tokens, every request of a subset (all backends) submitted at once (continuous batching), for:
  sgl            our default constraint mode (exact encodings + semantic guards with backtracking,
                 budget-aware closing);
  raw-llguidance llguidance's own JSON-schema support on the raw schema (no guards, no budget closing);
  raw-xgrammar   xgrammar's own JSON-schema support on the raw schema (idem).
The peers run behind the same Engine (same prompts, model, sampler, scheduler): only the grammar differs.

Per subset and backend: coverage = compiled AND the output validates with jsonschema (formats checked);
invalid = outputs that finished (stop or length) and do not validate (ours must be 0); rejected =
compile errors (ours: unsupported keywords, a 400); aborts (a guard's backtrack budget spent);
backtracks per 1K generated tokens (incl. the tokens taken back).

    python benchmarks/bench_grammar_model.py --n 100            # ~1 h on one thread (3 backends x 4 subsets)
    python benchmarks/bench_grammar.py --on-model 100           # the same, after the random-walk table

Writes benchmarks/results/bench_grammar_model.json.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import threading
import time
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("SGL_SHARED_DATA", ROOT.parent / "shared" / "data")) / "jsonschemabench-dev"
SUBSETS = ["Glaiveai2K", "Github_trivial", "Github_easy", "Github_medium"]
MODEL_BACKENDS = ["sgl", "raw-llguidance", "raw-xgrammar"]
PROMPT = "Produce a JSON document that matches this JSON schema:\n{schema}\nJSON:"


class RawCompiler:
    """A peer library's own JSON-schema compiler behind the two calls the Engine makes on its grammar
    compiler (`validate`, `compile_async`). Compile errors surface as the request's abort, like ours.
    Its matchers get no budget-aware closing (that is ours, not the library's)."""

    def __init__(self, name: str, vocab: Any, timeout_s: float = 30.0):
        from sgl.grammars import GrammarCompiler, GrammarError
        from bench_grammar import _make_compile  # noqa: E402 - benchmarks/ is on sys.path

        self.vocab = vocab
        self.timeout_s = timeout_s
        self._compile: Callable[[str], Any] = _make_compile("raw", name, vocab, GrammarCompiler, GrammarError)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"raw-{name}")

    def validate(self, kind: str, value: Any) -> None:
        if kind != "json_schema":
            raise ValueError(f"{kind} is not benchmarked here")

    def compile_async(self, kind: str, value: Any) -> "Future[Any]":
        fut: Future = Future()
        fut.set_running_or_notify_cancel()

        def run() -> None:  # NOTE: the timer starts with the compile, not while queued behind others
            timer = threading.Timer(self.timeout_s, _settle, args=(fut, None, TimeoutError("compile timeout")))
            timer.daemon = True
            timer.start()
            try:
                grammar = _NoBudget(self._compile(value if isinstance(value, str) else json.dumps(value)))
            except Exception as e:  # noqa: BLE001
                _settle(fut, None, e)
            else:
                _settle(fut, grammar, None)
            timer.cancel()
        self._pool.submit(run)
        return fut

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class Dispatch:
    """One Engine, every backend at once: each request's schema text carries its backend as a count of
    trailing blanks (0 = ours; JSON ignores them, so every backend sees the same schema), and `validate`
    / `compile_async` route to that backend's compiler. Requests of all backends then share one batch and
    the radix cache shares their (identical) prompts."""

    def __init__(self, compilers: list[Any]):
        self.compilers = compilers

    @staticmethod
    def tag(schema_text: str, index: int) -> str:
        return schema_text.rstrip() + " " * index

    def _route(self, value: Any) -> Any:
        return self.compilers[len(value) - len(value.rstrip(" "))]

    def validate(self, kind: str, value: Any) -> None:
        self._route(value).validate(kind, value)

    def compile_async(self, kind: str, value: Any) -> "Future[Any]":
        return self._route(value).compile_async(kind, value)


class _NoBudget:
    """A compiled peer grammar whose matchers ignore `set_token_budget` (the peers have no such feature)."""

    def __init__(self, grammar: Any):
        self._g = grammar

    def matcher(self) -> Any:
        m = self._g.matcher()
        m.set_token_budget = lambda n: None
        return m


def _settle(fut: Future, result: Any, exc: Any) -> None:
    try:
        if exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(result)
    except Exception:  # noqa: BLE001 - already settled (timeout raced the compile)
        pass


def sample_files(n: int, seed: int, subsets: list[str], data: Path) -> dict[str, list[Path]]:
    """bench_grammar's fixed sample: the same seeded draw per subset, so the first N agree across runs.
    NOTE: one RNG draws for EVERY subset in SUBSETS order (as bench_grammar.py does), then the asked ones
    are kept: drawing only for `subsets` made a subset's sample depend on the --subsets list."""
    rng = random.Random(seed)
    files = {s: sorted((data / s).glob("*.json")) for s in SUBSETS}
    missing = [s for s in subsets if not files.get(s)]
    if missing:
        raise SystemExit(f"no schemas for {missing} under {data} (set SGL_SHARED_DATA to the shared data folder)")
    drawn = {s: rng.sample(fs, min(n, len(fs))) for s, fs in files.items()}
    return {s: drawn[s] for s in subsets}


def _judge(schema: Any, text: str) -> bool:
    import jsonschema
    try:
        cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
        return bool(cls(schema, format_checker=cls.FORMAT_CHECKER).is_valid(json.loads(text)))
    except Exception:  # noqa: BLE001 - not JSON (a cut or an abort's partial text)
        return False


def _one(eng: Any, path: Path, max_new_tokens: int, backend_index: int = 0) -> dict:
    from sgl.runtime.protocol import RequestError

    text = path.read_text()
    schema = json.loads(text)
    t0 = time.perf_counter()
    try:
        res = eng.generate(PROMPT.format(schema=text[:2000]), {"json_schema": Dispatch.tag(text, backend_index),
                                                               "max_new_tokens": max_new_tokens, "temperature": 0})
    except RequestError as e:
        return {"file": path.name, "status": "rejected", "valid": False, "error": str(e)[:200], "tokens": 0,
                "backtracks": 0}
    meta = res["meta_info"]
    msg = meta["finish_reason"].get("message", "") or ""
    status = meta["finish_reason"]["type"]
    if status == "abort" and "grammar compilation failed" in msg:
        status = "rejected"
    return {"file": path.name, "status": status, "valid": status != "rejected" and _judge(schema, res["text"]),
            "tokens": meta["completion_tokens"] + meta.get("grammar_backtracked_tokens", 0),
            "backtracks": meta.get("grammar_backtracks", 0), "s": round(time.perf_counter() - t0, 2),
            "closed_early": bool(meta.get("grammar_closed_early")), "error": msg[:200],
            "text": res["text"][:300] if status != "abort" else ""}


def summarize(rows: list[dict], wall_s: float) -> dict:
    gen = [r for r in rows if r["status"] != "rejected"]
    toks = sum(r["tokens"] for r in gen)
    bad = [r for r in gen if not r["valid"] and r["status"] != "abort"]
    return {
        "n": len(rows), "rejected": len(rows) - len(gen), "valid": sum(r["valid"] for r in rows),
        "coverage": round(sum(r["valid"] for r in rows) / max(len(rows), 1), 4),
        "invalid": len(bad), "invalid_stop": sum(r["status"] == "stop" for r in bad),
        "invalid_length": sum(r["status"] == "length" for r in bad),
        "aborts": sum(r["status"] == "abort" for r in gen),
        "backtracks_per_1k_tokens": round(1000 * sum(r["backtracks"] for r in gen) / max(toks, 1), 2),
        "tokens": toks, "wall_s": round(wall_s, 1),  # NOTE: the wall time of the whole batch (all backends)
        "rows": rows,
    }


def run_on_model(n: int, seed: int, subsets: list[str], data: Path, max_new_tokens: int = 512,
                 backends: tuple[str, ...] = ("sgl",), num_threads: int = 1, max_total_tokens: int = 49152,
                 out_path: Path | None = None, first: int | None = None) -> dict:
    """`first`: run only the first K schemas of the n-sample (the same schemas as a full run's first K)."""
    from sgl.runtime.engine import Engine

    warnings.simplefilter("ignore")
    sample = {s: fs[:first] for s, fs in sample_files(n, seed, subsets, data).items()}
    eng = Engine(model_path="default", num_threads=num_threads, max_total_tokens=max_total_tokens,
                 max_running_requests=max(64, len(backends) * max(len(v) for v in sample.values())))
    ours = eng.grammar
    peers = [RawCompiler(b.removeprefix("raw-"), ours.vocab) for b in backends if b != "sgl"]
    compilers, it = [], iter(peers)
    for b in backends:
        compilers.append(ours if b == "sgl" else next(it))
    out: dict[str, Any] = {"n_per_subset": min(n, first or n), "max_new_tokens": max_new_tokens,
                           "num_threads": num_threads, "max_total_tokens": max_total_tokens,
                           "load_start": os.getloadavg(), "results": {}}
    try:
        eng.grammar = Dispatch(compilers)
        for subset in subsets:  # every backend's requests of a subset in one concurrent batch
            jobs = [(b, i, p) for i, b in enumerate(backends) for p in sample[subset]]
            t0 = time.perf_counter()
            with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
                rows = list(pool.map(lambda j: (j[0], _one(eng, j[2], max_new_tokens, j[1])), jobs))
            wall = time.perf_counter() - t0
            for b in backends:
                s = summarize([r for bb, r in rows if bb == b], wall)
                s["load"] = os.getloadavg()
                out["results"].setdefault(b, {})[subset] = s
                brief = {k: v for k, v in s.items() if k != "rows"}
                print(f"  on-model {b:15s} {subset:15s} {json.dumps(brief)}", flush=True)
            if out_path is not None:  # partial results survive an interrupted run
                out_path.write_text(json.dumps(out, indent=1))
        eng.grammar = ours
        eng.check_integrity()
        out["integrity"] = "ok"
    finally:
        eng.grammar = ours
        for c in peers:
            c.shutdown()
        eng.shutdown()
    return out


def print_on_model(res: dict) -> None:
    print(f"on the default model (greedy, <= {res['max_new_tokens']} tokens, {res['n_per_subset']} schemas per subset, "
          f"{res['num_threads']} thread(s)):")
    print(f"{'backend':15s} {'subset':15s} {'n':>3s} {'cov%':>6s} {'invalid':>7s} {'aborts':>6s} {'rejected':>8s} "
          f"{'bt/1k':>6s} {'wall s':>7s}")
    for b, per in res["results"].items():
        for s, x in per.items():
            print(f"{b:15s} {s:15s} {x['n']:3d} {100 * x['coverage']:6.1f} {x['invalid']:7d} {x['aborts']:6d} "
                  f"{x['rejected']:8d} {x['backtracks_per_1k_tokens']:6.2f} {x['wall_s']:7.0f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=100, help="schemas per subset (bench_grammar's fixed sample order)")
    p.add_argument("--first", type=int, default=None, help="only the first K of the --n sample (a cheaper subsample)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--subsets", nargs="+", default=SUBSETS)
    p.add_argument("--backends", nargs="+", default=MODEL_BACKENDS, choices=MODEL_BACKENDS)
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--num-threads", type=int, default=1)
    p.add_argument("--max-total-tokens", type=int, default=49152, help="KV pool slots (the batch queues beyond it)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "bench_grammar_model.json"))
    args = p.parse_args()
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    res = run_on_model(args.n, args.seed, args.subsets, DATA, args.max_new_tokens, tuple(args.backends),
                       args.num_threads, args.max_total_tokens, out_path, args.first)
    res["wall_s"] = round(time.perf_counter() - t0, 1)
    out_path.write_text(json.dumps(res, indent=1))
    print_on_model(res)
    print(f"wrote {out_path} in {res['wall_s']:.0f} s")


if __name__ == "__main__":
    main()

"""Grammar backends on real-world JSON schemas (JSONSchemaBench dev set), default model's vocabulary.

For every backend, in the same run, over a fixed random sample of each subset:
  compile time (p50/p90/p99; schemas that compiled within --timeout), per-token mask time (median/p99
  over every fill during the random walks), coverage = compiled within the timeout, WITHOUT silently
  relaxing the schema (xgrammar's logged fallbacks, our strict_json=False warnings), AND every sample
  the grammar produced validates with `jsonschema` (samples: --walks random walks per schema that pick
  uniformly among allowed tokens, biased toward closing tokens so they finish).
Backends: sgl-<name> = our JSON-schema normalizer + that engine (what `--grammar-backend <name>` runs);
sgl-llguidance = the default: exact encodings + semantic guards with backtracking (grammars/guards.py);
sgl-llguidance-strict = --json-strict (no guards: what needs one is rejected);
sgl-llguidance-lenient = strict_json=False (overlapping oneOf as anyOf, uniqueItems ignored);
raw-<name> = the library's own JSON-schema support on the raw schema (the baselines the issue measured).
Each backend runs in a worker process that is killed and restarted on a timeout.

    python benchmarks/bench_grammar.py --sample 50 --outlines-sample 8     # ~8 min on one thread
    python benchmarks/bench_grammar.py --e2e                               # + decode tokens/s on the model

Writes benchmarks/results/bench_grammar.json and prints one table (ratios vs sgl-llguidance).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("SGL_SHARED_DATA", ROOT.parent / "shared" / "data")) / "jsonschemabench-dev"
SUBSETS = ["Glaiveai2K", "Github_trivial", "Github_easy", "Github_medium"]
BACKENDS = ["sgl-llguidance", "sgl-llguidance-strict", "sgl-llguidance-lenient", "sgl-xgrammar", "sgl-outlines", "raw-llguidance",
            "raw-xgrammar", "raw-outlines"]


# ------------------------------------------------------------------------------------------ worker
def _worker(backend: str, tok_path: str, eos: list[int], conn: Any, walks: int, max_steps: int) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    warnings.simplefilter("ignore")
    import numpy as np
    import torch
    from tokenizers import Tokenizer

    torch.set_num_threads(1)
    from sgl.grammars import GrammarCompiler, GrammarError, Vocabulary

    vocab = Vocabulary.from_tokenizer(Tokenizer.from_file(tok_path), frozenset(eos), None)
    kind, name = backend.split("-", 1)
    compile_fn = _make_compile(kind, name, vocab, GrammarCompiler, GrammarError)
    closing = np.array([bool(b) and len(b) <= 3 and any(c in b for c in b'"}],') for b in vocab.token_bytes]
                       + [False] * (vocab.vocab_size_padded - vocab.vocab_size))
    conn.send(("ready", None))
    while True:
        msg = conn.recv()
        if msg is None:
            return
        schema, seed = msg
        t0 = time.perf_counter()
        try:
            with _CaptureStderr() as cap, warnings.catch_warnings(record=True) as pyw:
                warnings.simplefilter("always")
                grammar = compile_fn(schema)
        except Exception as e:  # noqa: BLE001
            conn.send(("error", f"{type(e).__name__}: {str(e)[:200]}"))
            continue
        dt = time.perf_counter() - t0
        # NOTE: a backend that silently relaxes the schema (xgrammar: "oneOf ... falling back to anyOf
        # semantics", "ignoring minLength/maxLength"; ours with strict_json=False) is not correct on it
        relaxed = [ln for ln in cap.text.splitlines() if "Warning" in ln]
        relaxed += [str(w.message) for w in pyw if "strict_json=False" in str(w.message)]
        conn.send(("compiled", (dt, relaxed[:5])))
        rng = random.Random(seed)
        samples, mask_times, walk_errors, stats = [], [], [], {"tokens": 0, "backtracks": 0, "mask_cpu_us": []}
        for _ in range(walks):
            text, err = _random_walk(grammar.matcher(), vocab, rng, max_steps, closing, mask_times, np, torch, stats)
            if err:
                walk_errors.append(err[:200])
            elif text is not None:
                samples.append(text)
        conn.send(("walked", {"samples": samples, "mask_us": mask_times, "walk_errors": walk_errors, **stats}))


def _make_compile(kind: str, name: str, vocab: Any, GrammarCompiler: Any, GrammarError: Any):
    if kind == "sgl":
        lenient = name.endswith("-lenient")  # overlapping oneOf / uniqueItems accepted with a warning
        strict = name.endswith("-strict")  # --json-strict: no semantic guards, unenforceable keywords rejected
        c = GrammarCompiler(vocab, backend=name.removesuffix("-lenient").removesuffix("-strict"),
                            strict_json=not lenient, guards=not strict)
        return lambda schema: c.compile_spec(c.to_spec("json_schema", schema))
    if name == "llguidance":
        from llguidance import LLMatcher
        from sgl.grammars.backends.llguidance_backend import LLGuidanceGrammar, LLGuidanceBackend
        be = LLGuidanceBackend(vocab, None)  # type: ignore[arg-type]
        opts = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}

        def comp(schema):
            m = LLMatcher(be._tok, LLMatcher.grammar_from_json_schema(schema, overrides=opts), log_level=0)
            if m.is_error():
                raise GrammarError(m.get_error())
            return LLGuidanceGrammar(None, vocab, m)  # type: ignore[arg-type]
        return comp
    if name == "xgrammar":
        from sgl.grammars.backends.xgrammar_backend import XGrammarBackend, XGrammarGrammar
        be = XGrammarBackend(vocab, None)  # type: ignore[arg-type]
        return lambda schema: XGrammarGrammar(None, vocab, be._compiler.compile_json_schema(  # type: ignore[arg-type]
            schema, any_whitespace=False, separators=(",", ":"), strict_mode=False))
    if name == "outlines":
        from outlines_core import Index
        from outlines_core.json_schema import build_regex_from_schema
        from sgl.grammars.backends.outlines_backend import OutlinesBackend, OutlinesGrammar
        be = OutlinesBackend(vocab, None)  # type: ignore[arg-type]
        return lambda schema: OutlinesGrammar(None, vocab, Index(build_regex_from_schema(schema, whitespace_pattern=""),  # type: ignore[arg-type]
                                                                    be._ovocab))
    raise ValueError(name)


def _random_walk(m: Any, vocab: Any, rng: random.Random, max_steps: int, closing: Any, mask_times: list,
                 np: Any, torch: Any, stats: dict) -> tuple[Optional[str], Optional[str]]:
    """Mask time = fill_bitmask + accept (where semantic guards check closed values), wall clock and this
    thread's CPU time (the latter does not count the time other processes held the core: a loaded
    machine inflates wall-clock percentiles); a guard's rollback request is honoured like the scheduler
    does (truncate, matcher.rollback)."""
    W = (vocab.vocab_size_padded + 31) // 32
    mask = torch.zeros(1, W, dtype=torch.int32)
    out: list[int] = []
    eos = vocab.eos_token_id
    for _ in range(max_steps):
        c0, t0 = time.thread_time_ns(), time.perf_counter()
        m.fill_bitmask(mask, 0)
        mask_times.append((time.perf_counter() - t0) * 1e6)
        stats["mask_cpu_us"].append((time.thread_time_ns() - c0) / 1e3)
        if m.error:
            return None, m.error
        bits = np.unpackbits(mask.numpy().view(np.uint8), bitorder="little")[: vocab.vocab_size_padded].astype(bool)
        allowed = np.flatnonzero(bits)
        if bits[eos] and (len(allowed) == 1 or rng.random() < 0.5):
            return vocab.decode(out).decode("utf-8", errors="replace"), None
        close = np.flatnonzero(bits & closing)
        pool = close if len(close) and rng.random() < 0.5 else allowed
        t = int(pool[rng.randrange(len(pool))])
        if t == eos:
            return vocab.decode(out).decode("utf-8", errors="replace"), None
        c1, t1 = time.thread_time_ns(), time.perf_counter()
        ok = m.accept(t)
        mask_times[-1] += (time.perf_counter() - t1) * 1e6
        stats["mask_cpu_us"][-1] += (time.thread_time_ns() - c1) / 1e3
        if not ok:
            return None, m.error or "accept failed"
        out.append(t)
        stats["tokens"] += 1
        keep = m.take_rollback() if hasattr(m, "take_rollback") else None
        if keep is not None:
            m.rollback(len(out) - keep)
            del out[keep:]
            stats["backtracks"] += 1
        elif m.error:
            return None, m.error
    return None, None  # did not finish: not judged


class _CaptureStderr:
    """Capture what native code writes to fd 2 (xgrammar logs its schema relaxations there)."""

    def __enter__(self) -> "_CaptureStderr":
        sys.stderr.flush()
        self._file = tempfile.TemporaryFile(mode="w+b")
        self._saved = os.dup(2)
        os.dup2(self._file.fileno(), 2)
        self.text = ""
        return self

    def __exit__(self, *exc: Any) -> None:
        sys.stderr.flush()
        os.dup2(self._saved, 2)
        os.close(self._saved)
        self._file.seek(0)
        self.text = self._file.read().decode("utf-8", errors="replace")
        self._file.close()


class Worker:
    def __init__(self, backend: str, tok_path: str, eos: list[int], walks: int, max_steps: int):
        self.args = (backend, tok_path, eos)
        self.walks, self.max_steps = walks, max_steps
        self.proc: Optional[mp.Process] = None
        self.start()

    def start(self) -> None:
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker, args=(*self.args, child, self.walks, self.max_steps), daemon=True)
        self.proc.start()
        if not self.conn.poll(120):
            raise RuntimeError(f"worker {self.args[0]} did not start")
        self.conn.recv()

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.join()

    def run(self, schema: str, seed: int, timeout: float) -> dict:
        self.conn.send((schema, seed))
        if not self.conn.poll(timeout):
            self.kill()
            self.start()
            return {"status": "timeout"}
        tag, val = self.conn.recv()
        if tag == "error":
            return {"status": "error", "error": val}
        res = {"status": "compiled", "compile_s": val[0], "relaxed": val[1]}
        if not self.conn.poll(120):
            self.kill()
            self.start()
            return dict(res, walk="timeout")
        res.update(self.conn.recv()[1])
        return res


# ----------------------------------------------------------------------------------------- driver
def _pct(xs: list[float], q: float) -> Optional[float]:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def judge(schema_text: str, res: dict) -> dict:
    """Adds `invalid` (samples that fail jsonschema) and `correct` to one result."""
    import jsonschema
    if res["status"] != "compiled":
        return dict(res, correct=False, invalid=0)
    schema = json.loads(schema_text)
    try:
        v = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)(schema)
    except Exception:  # noqa: BLE001
        return dict(res, correct=False, invalid=0, judge_error=True)
    invalid = []
    for s in res.get("samples", []):
        try:
            ok = v.is_valid(json.loads(s))
        except Exception:  # noqa: BLE001 - not JSON at all, or the validator chokes on the schema
            ok = False
        if not ok:
            invalid.append(s[:300])
    return dict(res, invalid=len(invalid), invalid_examples=invalid[:2],
                correct=not invalid and not res.get("relaxed") and not res.get("walk_errors")
                and res.get("walk") != "timeout")


def run(args: argparse.Namespace) -> dict:
    sys.path.insert(0, str(ROOT / "tests" / "grammars"))
    from grammar_testlib import load_default_tokenizer  # noqa: E402

    tok, eos = load_default_tokenizer()
    tok_path = os.path.join(tempfile.mkdtemp(), "tokenizer.json")
    tok.save(tok_path)
    rng = random.Random(args.seed)
    files = {s: sorted((DATA / s).glob("*.json")) for s in SUBSETS}
    sample = {s: rng.sample(fs, min(args.sample, len(fs))) for s, fs in files.items()}
    results: dict = {"args": vars(args), "vocab_size": tok.get_vocab_size(), "backends": {}}
    for backend in args.backends:
        n = args.outlines_sample if backend.endswith("outlines") else args.sample
        worker = Worker(backend, tok_path, sorted(eos), args.walks, args.max_steps)
        per_subset = {}
        t_backend = time.perf_counter()
        for subset in SUBSETS:
            rows = []
            for i, path in enumerate(sample[subset][:n]):
                text = path.read_text()
                res = judge(text, worker.run(text, args.seed + i, args.timeout))
                res.pop("samples", None)
                mask_us, mask_cpu = res.pop("mask_us", []), res.pop("mask_cpu_us", [])
                rows.append(dict(res, file=path.name, mask_us_summary=[_pct(mask_us, .5), _pct(mask_us, .99)],
                                 _mask=mask_us, _mask_cpu=mask_cpu))
            per_subset[subset] = summarize(rows)
            print(f"  {backend:22s} {subset:15s} {json.dumps({k: v for k, v in per_subset[subset].items() if k != 'failures'})}",
                  flush=True)
        worker.conn.send(None)
        worker.kill()
        results["backends"][backend] = {"subsets": per_subset, "wall_s": time.perf_counter() - t_backend}
    return results


def summarize(rows: list[dict]) -> dict:
    compiled = [r for r in rows if r["status"] == "compiled"]
    cts = [r["compile_s"] * 1e3 for r in compiled]
    masks = [x for r in rows for x in r.get("_mask", [])]
    cpu = [x for r in rows for x in r.get("_mask_cpu", [])]
    return {
        "n": len(rows), "compiled": len(compiled), "timeouts": sum(r["status"] == "timeout" for r in rows),
        "errors": sum(r["status"] == "error" for r in rows),
        "invalid_schemas": sum(r.get("invalid", 0) > 0 for r in rows),
        "relaxed_schemas": sum(bool(r.get("relaxed")) for r in rows),
        "invalid_samples": sum(r.get("invalid", 0) for r in rows),
        "coverage": round(sum(r["correct"] for r in rows) / max(len(rows), 1), 4),
        "compile_ms_p50": _pct(cts, .5), "compile_ms_p90": _pct(cts, .9), "compile_ms_p99": _pct(cts, .99),
        "mask_us_p50": _pct(masks, .5), "mask_us_p99": _pct(masks, .99), "mask_calls": len(masks),
        "mask_cpu_us_p50": _pct(cpu, .5), "mask_cpu_us_p99": _pct(cpu, .99),
        "backtracks_per_1k_tokens": round(1000 * sum(r.get("backtracks", 0) for r in rows)
                                          / max(sum(r.get("tokens", 0) for r in rows), 1), 2),
        "failures": [{k: r.get(k) for k in ("file", "status", "error", "relaxed", "invalid_examples", "walk_errors")}
                     for r in rows if not r["correct"]][:20],
    }


def print_table(results: dict) -> None:
    ref = results["backends"].get("sgl-llguidance")
    hdr = (f"{'backend':22s} {'subset':15s} {'n':>4s} {'cov%':>6s} {'inval':>5s} {'relax':>5s} {'t/o':>4s} {'c_p50ms':>8s} "
           f"{'c_p90ms':>8s} {'c_p99ms':>8s} {'m_p50us':>8s} {'m_p99us':>8s} {'cpu_p99':>8s} {'bt/1k':>6s}  ratio(p50 compile, mask) vs sgl-llguidance")
    print(hdr)
    f = lambda x: "-" if x is None else (f"{x:.1f}" if x < 1000 else f"{x:.0f}")  # noqa: E731
    for b, r in results["backends"].items():
        for s, x in r["subsets"].items():
            rs = ref["subsets"][s] if ref else None
            ratio = ""
            if rs and x["compile_ms_p50"] and rs["compile_ms_p50"] and x["mask_us_p50"] and rs["mask_us_p50"]:
                ratio = f"{x['compile_ms_p50'] / rs['compile_ms_p50']:.2f}x, {x['mask_us_p50'] / rs['mask_us_p50']:.2f}x"
            print(f"{b:22s} {s:15s} {x['n']:4d} {100 * x['coverage']:6.1f} {x['invalid_schemas']:5d} "
                  f"{x['relaxed_schemas']:5d} {x['timeouts']:4d} "
                  f"{f(x['compile_ms_p50']):>8s} {f(x['compile_ms_p90']):>8s} {f(x['compile_ms_p99']):>8s} "
                  f"{f(x['mask_us_p50']):>8s} {f(x['mask_us_p99']):>8s} {f(x.get('mask_cpu_us_p99')):>8s} "
                  f"{x.get('backtracks_per_1k_tokens', 0):6.2f}  {ratio}")
    if "e2e" in results:
        print("e2e:", json.dumps(results["e2e"]))
    if "on_model" in results:
        from bench_grammar_model import print_on_model  # noqa: E402
        print_on_model(results["on_model"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sample", type=int, default=50, help="schemas per subset (fast backends)")
    p.add_argument("--outlines-sample", type=int, default=8, help="schemas per subset for outlines (slow)")
    p.add_argument("--timeout", type=float, default=10.0)
    p.add_argument("--walks", type=int, default=3)
    p.add_argument("--max-steps", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backends", nargs="+", default=BACKENDS)
    p.add_argument("--e2e", action="store_true", help="also measure decode tokens/s on the default model")
    p.add_argument("--on-model", type=int, default=0, metavar="N",
                   help="also generate greedily (<= 512 tokens) on the default model for N schemas per subset "
                        "(ours, raw llguidance, raw xgrammar; bench_grammar_model.py): coverage, invalid outputs, "
                        "backtracks per 1K tokens")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "bench_grammar.json"))
    args = p.parse_args()
    t0 = time.perf_counter()
    results = run(args)
    if args.on_model:
        from bench_grammar_model import MODEL_BACKENDS, run_on_model  # noqa: E402
        results["on_model"] = run_on_model(args.on_model, args.seed, SUBSETS, DATA, backends=tuple(MODEL_BACKENDS))
    if args.e2e:
        from bench_grammar_e2e import run_e2e  # noqa: E402
        results["e2e"] = run_e2e()
    results["wall_s"] = time.perf_counter() - t0
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1, default=str))
    print_table(results)
    print(f"wrote {args.out} in {results['wall_s']:.0f} s")


if __name__ == "__main__":
    main()

"""Speculative decoding on the default model: each algorithm vs none, same run, same threads.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_speculative.py --threads 1 [--quick] [--crossover]

Workloads (greedy, one engine per algorithm, all loaded at once; each round runs the workload prompt by prompt, every
engine on a prompt before the next prompt, so that a shared machine's drift hits every algorithm alike):
  (a) JSON extraction that copies names, cities and years from a ~300-token document (examples/data),
  (b) chat answers to 32 questions, one request at a time (batch 1),
  (c) the 6-field schema extraction constrained by json_schema (examples/data/person_extraction.json)
      over people of examples/data/people.txt, batch 1,
  (d) (b) in batches of 8 (speculation on only while <= --speculative-max-batch rows decode).
Per workload and algorithm: output tokens/s and tokens per CPU-second of the process (both as ratios
vs none; on a shared machine the CPU-time ratio is the steadier one), decode tokens/s (the time after
each request's first token: speculation does not change the prefill; wall time), mean accept length
(tokens per verify step), outputs token-identical to none, and for (c) the share of outputs valid under jsonschema.
`--crossover` adds 8 prompts of (b) at batch 1/2/4/8 with speculation on at every batch size (max batch 64), to show
where verify rows stop paying (`--workloads none --crossover`: only that; with ORACLE, the ceiling at each batch
size). `--verify-cost` times one forward step of a verify row of 1 + j tokens over a
300-token context against a plain decode step (where a speculative step's time goes).
Algorithms: NGRAM (chain, own sequence); NGRAM_TREE (NGRAM with 3 continuations merged into a tree
and finished requests' sequences matched too); MEDUSA (the shipped self-distilled heads, a static
tree); EAGLE (the shipped self-distilled one-layer head, a chain, q8_0 draft steps); EAGLE_TREE (the same head
drafting token trees, `--eagle-topk` children per node); NAME_FIXED (e.g. EAGLE_FIXED): NAME with its drafts cut at
one length per request, as before drafts were scored (the A/B of speculative_rows.scored_cut); NAME_BLIND (e.g. EAGLE_BLIND): NAME with drafts that
ignore the grammar (runtime/speculative/grammar_walk.py off; verification still cuts what the mask forbids);
NAME+NGRAM (e.g. EAGLE+NGRAM): NAME behind an NGRAM lane (`--speculative-ngram-first`, NGRAM_TREE's settings): NGRAM
drafts where the text matches, NAME elsewhere; NAME+CORPUS (e.g. NGRAM_TREE+CORPUS, EAGLE+NGRAM+CORPUS): its NGRAM
matches the shipped corpus too (`--speculative-ngram-corpus default`); DRAFT uses the default model as its own draft (an identity check: no smaller model with this
tokenizer ships here), so its speed ratio is below 1 by construction. NAME@PATH (e.g. MEDUSA@/tmp/old-heads): NAME with
its heads from PATH (`--speculative-draft-model-path`), beside NAME with the shipped ones in the same run; for an
NGRAM algorithm with +CORPUS (e.g. NGRAM_TREE+CORPUS@/tmp/corpus.jsonl.gz), PATH is its corpus. NAME_STATIC (e.g.
EAGLE_STATIC): NAME with the adaptive rule of stop 33, its start-up verify cost never corrected by the steps it runs
and the drafter's catch-up not priced (the A/B of verify_cost.ObservedCost and speculative_rows.per_step).
ORACLE: the ceiling of any drafter on this machine. NGRAM's engine with each request's `prediction` set to no
speculation's output ids for it (run just before on the same prompt): drafts that are always right and cost
nothing, under the same adaptive rule and verify cost (runtime/speculative/prediction.py). Identical outputs too.
Prints one table and writes benchmarks/results/bench_speculative.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Optional

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import jsonschema  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
from fork_join_agent import questions  # noqa: E402

import sgl.runtime.speculative.grammar_walk as grammar_walk  # noqa: E402
from sgl.runtime.engine import Engine  # noqa: E402

DATA = ROOT / "examples" / "data"
PEOPLE = (DATA / "people.txt").read_text().splitlines()
PERSON = json.loads((DATA / "person_extraction.json").read_text())


BLIND = "_BLIND"  # an algorithm name's suffix: its drafter ignores the grammar (grammar_walk.ENABLED off: the A/B)
FIXED = "_FIXED"  # an algorithm name's suffix: the rule ignores its drafts' scores (one length per request: the A/B)
STATIC = "_STATIC"  # an algorithm name's suffix: the rule keeps its start-up cost and prices no catch-up (the A/B)
NGRAM_FIRST = "+NGRAM"  # an algorithm name's suffix: --speculative-ngram-first, with NGRAM_TREE's settings
CORPUS = "+CORPUS"  # an algorithm name's suffix: its NGRAM (algorithm or lane) matches the shipped corpus too
ORACLE = "ORACLE"  # NGRAM's engine, each request predicted (`prediction`) by no speculation's output: the ceiling


def chat(user: str) -> str:
    return f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"


def workloads(quick: bool) -> dict[str, tuple[list[str], dict[str, Any], int]]:
    """name -> (prompts, sampling params, batch size)."""
    docs = ["\n".join(PEOPLE[i:i + 12]) for i in range(0, 48, 12)][: 2 if quick else 4]  # ~300 tokens each
    extract = [chat("List every person in this text as a JSON array of objects with the keys name, job, "
                    f"city and born.\n\n{d}") for d in docs]
    qs = [chat(q) for q in questions(8 if quick else 32)]
    people = [chat("Extract the person as JSON: " + p) for p in PEOPLE[: 3 if quick else 8]]  # as PERSON["prompt"]
    schema = {"json_schema": json.dumps(PERSON["schema"]), "max_new_tokens": 160, "temperature": 0}
    return {
        "a_copy_extraction": (extract, {"max_new_tokens": 192, "temperature": 0}, 1),
        "b_chat": (qs, {"max_new_tokens": 64, "temperature": 0}, 1),
        "c_schema": (people, schema, 1),
        "d_chat_batch8": (qs, {"max_new_tokens": 64, "temperature": 0}, 8),
    }


def run_workload(eng: Engine, prompts: list[str], params: dict[str, Any], batch: int,
                 predictions: Optional[list[list[int]]] = None) -> dict[str, Any]:
    """`predictions`: each prompt's `prediction`, token ids (ORACLE), else none."""
    outs: list[dict[str, Any]] = []
    each = [params if predictions is None else dict(params, prediction=p) for p in predictions or prompts]
    t0, c0 = time.perf_counter(), time.process_time()
    for i in range(0, len(prompts), batch):
        chunk = prompts[i:i + batch]
        res = eng.generate(chunk, each[i:i + batch])
        outs += res if isinstance(res, list) else [res]
    seconds = time.perf_counter() - t0
    # NOTE: CPU seconds of the whole process (the engines run in it; only this one is busy): a shared
    # machine's other jobs stretch wall time far more than they stretch this
    cpu = time.process_time() - c0
    tokens = sum(o["meta_info"]["completion_tokens"] for o in outs)
    # the decode phase (after each request's first token: speculation does not touch its prefill), wall time
    decode_s = sum(o["meta_info"]["e2e_latency"] - o["meta_info"].get("first_token_latency", 0.0) for o in outs)
    decode_tokens = tokens - sum(1 for o in outs if o["meta_info"]["completion_tokens"])
    verify = sum(o["meta_info"].get("spec_verify_ct", 0) for o in outs)
    produced = sum(o["meta_info"].get("spec_accept_length", 0.0) * o["meta_info"].get("spec_verify_ct", 0)
                   for o in outs)
    return rates({"seconds": seconds, "cpu_seconds": cpu, "tokens": tokens, "decode_seconds": decode_s,
                  "decode_tokens": decode_tokens, "verify": verify, "produced": produced,
                  "output_ids": [o["output_ids"] for o in outs], "texts": [o["text"] for o in outs]})


SUMMED = ("seconds", "cpu_seconds", "tokens", "decode_seconds", "decode_tokens", "verify", "produced")


def rates(r: dict[str, Any]) -> dict[str, Any]:
    """`r` with its rates computed from its sums (SUMMED)."""
    r["tok_s"], r["tok_cpu_s"] = r["tokens"] / r["seconds"], r["tokens"] / r["cpu_seconds"]
    r["decode_tok_s"] = r["decode_tokens"] / r["decode_seconds"] if r["decode_seconds"] > 0 else 0.0
    r["accept_length"] = r["produced"] / r["verify"] if r["verify"] else None
    return r


def combined(parts: list[dict[str, Any]], outputs: bool) -> dict[str, Any]:
    """The run of several `run_workload` parts: sums and their rates; `outputs`: their outputs concatenated (the
    prompts of one round), else the first part's (rounds of the same prompts: greedy, the same outputs)."""
    out = {key: sum(p[key] for p in parts) for key in SUMMED}
    for key in ("output_ids", "texts"):
        out[key] = [x for p in parts for x in p[key]] if outputs else parts[0][key]
    return rates(out)


def valid_share(texts: list[str]) -> float:
    ok = 0
    for t in texts:
        try:
            jsonschema.validate(json.loads(t), PERSON["schema"])
            ok += 1
        except (ValueError, jsonschema.ValidationError):
            pass
    return ok / len(texts)


def engine_kwargs(algo: Optional[str], threads: int, max_batch: Optional[int], k: int,
                  eagle_head: Optional[str] = None, eagle_topk: int = 4,
                  act_quant: Optional[str] = None, corpus: str = "default") -> dict[str, Any]:
    kw: dict[str, Any] = dict(model_path="default", num_threads=threads, max_total_tokens=16384, show_progress=False)
    if algo == ORACLE:
        algo = "NGRAM"
    heads = None
    if algo is not None and "@" in algo:  # NAME@PATH: the algorithm with its heads from PATH
        algo, heads = algo.split("@", 1)
    for suffix in (BLIND, FIXED, STATIC):  # A/B switches set after the engine starts, not engine arguments
        algo = algo[: -len(suffix)] if algo is not None and algo.endswith(suffix) else algo
    if algo is not None and algo.endswith(CORPUS):  # e.g. NGRAM_TREE+CORPUS, EAGLE+NGRAM+CORPUS
        algo = algo[: -len(CORPUS)]
        kw["speculative_ngram_corpus"] = corpus
        if heads is not None and algo.startswith("NGRAM"):  # NGRAM...+CORPUS@PATH: PATH is the corpus
            kw["speculative_ngram_corpus"], heads = heads, None
    if algo is not None and algo.endswith(NGRAM_FIRST):  # e.g. EAGLE+NGRAM: NGRAM_TREE's lane in front
        algo = algo[: -len(NGRAM_FIRST)]
        kw.update(speculative_ngram_first=True, speculative_ngram_max_bfs_breadth=3, speculative_ngram_capacity=1 << 16)
    if act_quant is not None:
        kw["cpu_act_quant"] = act_quant
    if algo is not None:
        kw.update(speculative_algorithm=algo, speculative_num_draft_tokens=k)
        if algo == "NGRAM_TREE":
            kw.update(speculative_algorithm="NGRAM", speculative_ngram_max_bfs_breadth=3,
                      speculative_ngram_capacity=1 << 16)
        if algo == "DRAFT":
            kw["speculative_draft_model_path"] = "default"
        if algo == "EAGLE_TREE":
            kw.update(speculative_algorithm="EAGLE", speculative_eagle_topk=eagle_topk)
        if algo.startswith("EAGLE") and eagle_head is not None:
            kw["speculative_draft_model_path"] = eagle_head
        if heads is not None:
            kw["speculative_draft_model_path"] = heads
        if max_batch is not None:
            kw["speculative_max_batch"] = max_batch
    return kw


def lane_counts(before: dict[str, dict[str, float]], after: dict[str, dict[str, float]]) -> dict[str, dict[str, int]]:
    """Each drafter's verify rows, drafted and accepted tokens between two `spec_per_drafter` readings."""
    keys = ("verify_ct", "draft_tokens", "accepted_tokens")
    return {lane: {k: int(c[k] - before.get(lane, {}).get(k, 0)) for k in keys} for lane, c in after.items()}


def crossover(args: argparse.Namespace, names: list[str], results: dict[str, dict[str, Any]]) -> None:
    """--crossover: 8 prompts of (b) at batch 1, 2, 4 and 8 with speculation on at every batch size (max batch 64),
    every engine loaded at once and on each batch before the next (ORACLE after none, whose outputs it predicts),
    --reps rounds from a flushed cache: where verify rows stop paying (why --speculative-max-batch exists)."""
    prompts, params, _ = workloads(args.quick)["b_chat"]
    prompts = prompts[:8]
    engines = {n: Engine(**engine_kwargs(None if n == "none" else n, args.threads, 64, args.num_draft_tokens,
                                         args.eagle_head, args.eagle_topk, args.cpu_act_quant, args.ngram_corpus))
               for n in names}
    with checked(engines):
        for eng in engines.values():
            eng.generate(chat("Hello"), {"max_new_tokens": 8, "temperature": 0})  # warm-up
        for b in (1, 2, 4, 8):
            parts: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
            for _ in range(args.reps):
                assert all(eng.flush_cache() for eng in engines.values())
                for n in names:  # "none" first
                    truth = parts["none"][-1]["output_ids"] if n == ORACLE else None
                    parts[n].append(run_workload(engines[n], prompts, params, b, truth))
            for n in names:
                r = results.setdefault(f"crossover_b{b}", {})[n] = combined(parts[n], outputs=False)
                print(f"crossover batch {b} {n:6s} {r['tok_s']:7.1f} tok/s {r['tok_cpu_s']:7.1f} tok/cpu-s  "
                      f"accept {r['accept_length']}", flush=True)


@contextlib.contextmanager
def checked(engines: dict[str, Engine]) -> Iterator[None]:
    """Runs the block; then every engine's KV pool is checked (each slot back in the pool), and every engine is shut
    down whatever happened."""
    try:
        yield
        for eng in engines.values():
            eng.wait_idle()
            eng.check_integrity()
    finally:
        for eng in engines.values():
            eng.shutdown()


def verify_cost(threads: int, k: int, reps: int = 15, act_quant: Optional[str] = None) -> list[dict[str, Any]]:
    """The engine's own start-up measurement (runtime/speculative/verify_cost.py), over a 300-token context and
    more rounds: forward + lm_head of one row of 1 + j new tokens vs one of 1 token (paired, median)."""
    from sgl.runtime.speculative.verify_cost import measure_verify_cost

    eng = Engine(**engine_kwargs(None, threads, None, 4, act_quant=act_quant))
    try:
        runner = eng.scheduler.runner
        eng.wait_idle()
        cost = measure_verify_cost(runner.model, runner.kv, k, runner.vocab_size, reps=reps, context=300)
        rows = [{"draft_tokens": j, "ms": round(1000 * c * cost.decode_seconds, 2), "vs_decode": round(c, 3)}
                for j, c in cost.points]
        for r in rows:
            print(f"verify row 1+{r['draft_tokens']}: {r['ms']:.2f} ms ({r['vs_decode']:.2f}x a decode step)", flush=True)
        return rows
    finally:
        eng.shutdown()


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--algorithms", default="NGRAM,DRAFT", help="comma-separated, besides none")
    ap.add_argument("--num-draft-tokens", type=int, default=4)
    ap.add_argument("--quick", action="store_true", help="fewer documents and questions")
    ap.add_argument("--reps", type=int, default=2, help="rounds per workload, engines alternating")
    ap.add_argument("--reps-c", type=int, default=None,
                    help="rounds of workload (c) (default: 3 x --reps; a round is ~760 tokens, a few seconds, and "
                         "2-round ratios swung by ~0.1)")
    ap.add_argument("--reps-d", type=int, default=None,
                    help="rounds of workload (d) (default: 2 x --reps; a round is ~1.4 s, and 2-round ratios read "
                         "0.89-1.00x with no row drafted, before rounds interleaved the engines prompt by prompt)")
    ap.add_argument("--crossover", action="store_true", help="(b) at batch 1/2/4/8 with speculation forced on")
    ap.add_argument("--verify-cost", action="store_true", help="time verify rows of 1 + j tokens vs one decode step")
    ap.add_argument("--workloads", default="a,b,c,d", help="comma-separated workload letters")
    ap.add_argument("--eagle-head", default=None, help="EAGLE's head file (default: the shipped one)")
    ap.add_argument("--eagle-topk", type=int, default=4, help="EAGLE_TREE's --speculative-eagle-topk")
    ap.add_argument("--ngram-corpus", default="default", help="the +CORPUS algorithms' --speculative-ngram-corpus")
    ap.add_argument("--cpu-act-quant", default=None, help="every engine's --cpu-act-quant (default: the engine's)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "bench_speculative.json"))
    args = ap.parse_args(argv)
    reps_c = args.reps_c or 3 * args.reps
    reps_d = args.reps_d or 2 * args.reps
    load_before = os.getloadavg()
    work = {k: v for k, v in workloads(args.quick).items() if k[0] in args.workloads.split(",")}
    cost = verify_cost(args.threads, max(8, args.num_draft_tokens), act_quant=args.cpu_act_quant) if args.verify_cost else None
    algos: list[Optional[str]] = [None] + [a for a in args.algorithms.split(",") if a]
    results: dict[str, dict[str, Any]] = {}
    # All engines loaded at once; each round of a workload runs it prompt by prompt (a batch of (d) at a time), every
    # engine on it before the next, so that a shared machine's load drift hits every algorithm alike (tok/s = all
    # tokens / all seconds). Rounds were engine after engine before: one engine's whole round (~30 s of chat) could
    # fall in a slow minute, and (b)'s no-speculation rounds read 113 and 151 tok/s in one run.
    engines = {algo or "none": Engine(**engine_kwargs(algo, args.threads, None, args.num_draft_tokens, args.eagle_head,
                                                      args.eagle_topk, args.cpu_act_quant, args.ngram_corpus))
               for algo in algos}
    for name, eng in engines.items():
        if name.endswith(FIXED):
            for lane in eng.scheduler.spec.lanes:
                lane.drafter.scores_drafts = False
        if name.endswith(STATIC):
            eng.scheduler.spec.observed = None
            eng.scheduler.spec.per_step = lambda lane, req: 0.0
    # each engine's start-up verify cost (what its adaptive rule uses): [[j, decode steps], ...]
    engine_costs = {name: eng.get_server_info().get("spec_verify_cost") for name, eng in engines.items()}
    for name, c in engine_costs.items():
        if c:
            print(f"{name}: verify cost " + ", ".join(f"1+{j}: {x:.2f}x" for j, x in c[1:]), flush=True)
    with checked(engines):
        for eng in engines.values():
            eng.generate(chat("Hello"), {"max_new_tokens": 8, "temperature": 0})  # warm-up
        for wname, (prompts, params, batch) in work.items():
            reps = reps_c if wname.startswith("c_") else reps_d if wname.startswith("d_") else args.reps
            # self-draft at batch 8 is off by the max-batch rule anyway: nothing new
            names = [n for n in engines if not (n == "DRAFT" and wname.startswith("d_"))]
            for rep in range(reps):
                # NOTE: every round starts cold: a warm radix cache would skip the prefill of a repeated
                # prompt, and NGRAM's shared index would hold this very output from the round before
                assert all(engines[n].flush_cache() for n in names)
                lanes_before = {n: engines[n].get_stats().get("spec_per_drafter") or {} for n in names}
                parts: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
                for i in range(0, len(prompts), batch):
                    for n in names:
                        grammar_walk.ENABLED = not n.endswith(BLIND)
                        truth = parts["none"][-1]["output_ids"] if n == ORACLE else None  # "none" runs first
                        parts[n].append(run_workload(engines[n], prompts[i:i + batch], params, batch, truth))
                        grammar_walk.ENABLED = True
                for name in names:
                    r = combined(parts[name], outputs=True)
                    lanes = lane_counts(lanes_before[name], engines[name].get_stats().get("spec_per_drafter") or {})
                    print(f"{wname:18s} {name:6s} rep {rep} {r['tok_s']:7.1f} tok/s {r['tok_cpu_s']:7.1f} tok/cpu-s  "
                          f"accept {r['accept_length']}", flush=True)
                    acc = results.setdefault(wname, {}).get(name)
                    if acc is None:
                        results[wname][name] = r
                        r["per_drafter"] = lanes
                    else:  # sum the rounds (greedy: the same outputs and accept length every round)
                        per_drafter = acc["per_drafter"]
                        results[wname][name] = acc = combined([acc, r], outputs=False)
                        acc["per_drafter"] = per_drafter
                        for lane, counts in lanes.items():
                            for key, n in counts.items():
                                per_drafter[lane][key] += n
    if args.crossover:
        crossover(args, [a or "none" for a in algos if a != "DRAFT"], results)  # self-draft: an identity check
    table = []
    batch_of = {w: b for w, (_, _, b) in work.items()} | {w: int(w[len("crossover_b"):]) for w in results
                                                         if w.startswith("crossover_b")}
    for wname, by_algo in results.items():
        base = by_algo["none"]
        for name, r in by_algo.items():
            same = sum(a == b for a, b in zip(r["output_ids"], base["output_ids"])) / len(base["output_ids"])
            row = {"workload": wname, "algorithm": name, "tok_s": round(r["tok_s"], 2),
                   "ratio": round(r["tok_s"] / base["tok_s"], 3), "tok_cpu_s": round(r["tok_cpu_s"], 2),
                   "cpu_ratio": round(r["tok_cpu_s"] / base["tok_cpu_s"], 3),
                   # per-request decode times overlap in a batch: the decode rate is a batch-1 figure
                   "decode_tok_s": round(r["decode_tok_s"], 2) if batch_of[wname] == 1 else None,
                   "decode_ratio": round(r["decode_tok_s"] / base["decode_tok_s"], 3) if batch_of[wname] == 1 else None,
                   "accept_length": r["accept_length"],
                   "identical": same, "tokens": r["tokens"]}
            if len(r.get("per_drafter") or {}) > 1:  # lanes (NAME+NGRAM): verify rows and accepted drafts of each
                row["per_drafter"] = r["per_drafter"]
            if wname.startswith("c_"):
                row["valid"] = valid_share(r["texts"])
            table.append(row)
    print(f"\nthreads {args.threads}, load before {load_before[0]:.1f}, after {os.getloadavg()[0]:.1f}")
    print(f"{'workload':18s} {'algo':6s} {'tok/s':>7s} {'ratio':>6s} {'tok/cpu-s':>9s} {'ratio':>6s} "
          f"{'decode tok/s':>12s} {'ratio':>6s} {'accept':>6s} "
          f"{'ident':>6s} {'valid':>6s}")
    for row in table:
        acc = f"{row['accept_length']:.2f}" if row["accept_length"] else "-"
        valid = f"{row['valid']:.0%}" if "valid" in row else "-"
        decode = f"{row['decode_tok_s']:.1f}" if row["decode_tok_s"] is not None else "-"
        decode_ratio = f"{row['decode_ratio']:.2f}x" if row["decode_ratio"] is not None else "-"
        print(f"{row['workload']:18s} {row['algorithm']:6s} {row['tok_s']:7.1f} {row['ratio']:5.2f}x "
              f"{row['tok_cpu_s']:9.1f} {row['cpu_ratio']:5.2f}x {decode:>12s} {decode_ratio:>6s} {acc:>6s} "
              f"{row['identical']:6.0%} {valid:>6s}")
        if "per_drafter" in row:
            print(" " * 19 + "lanes: " + ", ".join(f"{lane} {c['verify_ct']} rows, {c['accepted_tokens']}/{c['draft_tokens']} "
                                                   "drafts accepted" for lane, c in row["per_drafter"].items()))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"threads": args.threads, "load_before": load_before,
                                          "load_after": os.getloadavg(), "num_draft_tokens": args.num_draft_tokens,
                                          "eagle_head": args.eagle_head, "eagle_topk": args.eagle_topk,
                                          "cpu_act_quant": args.cpu_act_quant, "ngram_corpus": args.ngram_corpus,
                                          "reps": args.reps, "reps_c": reps_c, "reps_d": reps_d,
                                          "table": table, "verify_cost": cost,
                                          "engine_verify_cost": engine_costs}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

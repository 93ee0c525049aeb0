"""A small agent pipeline: plan, fork into parallel tool-like steps, join, summarize.

    python examples/fork_join_agent.py "How do I keep basil alive indoors?"
    python examples/fork_join_agent.py --url http://127.0.0.1:30000 --batch 5

Each step picks a "tool" with `select` and writes one finding; the steps run in parallel forks that
share (through the radix cache) the KV of everything before the fork.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import sgl

TOOLS = ["search", "calculator", "notes"]
STEPS = 3

ROLES = ["student", "chef", "gardener", "nurse", "pilot"]
TOPICS = ["sleep", "saving money", "learning a language", "running", "cooking rice", "house plants",
          "time management", "public speaking", "bicycle repair", "first aid"]


def questions(n: int) -> list[str]:
    """n distinct questions (roles x topics), for batch runs and the benchmark."""
    qs = [f"What should a {r} know about {t}?" for t in TOPICS for r in ROLES]
    return [qs[i % len(qs)] for i in range(n)]


@sgl.function
def agent(s, question):
    s += sgl.system("You are a careful research assistant. Keep every answer to one short sentence.")
    s += sgl.user(f"Question: {question}\nWrite a three-step plan to answer it.")
    s += sgl.assistant(sgl.gen("plan", max_tokens=40))
    forks = s.fork(STEPS)
    for i, f in enumerate(forks):
        f += sgl.user(f"Carry out step {i + 1}. Which tool do you use: search, calculator or notes?")
        f += sgl.assistant(sgl.select("tool", choices=TOOLS))
        f += sgl.user("Report what you found in one sentence.")
        f += sgl.assistant(sgl.gen("finding", max_tokens=24, stop="\n"))
    forks.join()
    s += sgl.user("Findings:\n" + "".join(f"- ({forks[i]['tool']}) {forks[i]['finding']}\n" for i in range(STEPS))
                  + "Answer the question in one sentence.")
    s += sgl.assistant(sgl.gen("answer", max_tokens=32))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("question", nargs="?", default="How do I keep basil alive indoors?")
    ap.add_argument("--url", help="a running server (default: the in-process engine)")
    ap.add_argument("--batch", type=int, default=0, help="also run the agent over N generated questions")
    args = ap.parse_args(argv)

    backend: Any = sgl.RuntimeEndpoint(args.url) if args.url else sgl.Runtime(model_path="default",
                                                                              show_progress=False)
    try:
        t0 = time.monotonic()
        st = agent.run(question=args.question, backend=backend, temperature=0)
        print(f"question: {args.question}\nplan: {st['plan'].strip()}")
        for i, (tool, finding) in enumerate(zip(st["tool"], st["finding"])):
            print(f"step {i + 1} [{tool}]: {finding.strip()}")
        print(f"answer: {st['answer'].strip()}\n[{time.monotonic() - t0:.1f}s]")
        if args.batch:
            backend.reset_stats()
            t0 = time.monotonic()
            states = agent.run_batch([{"question": q} for q in questions(args.batch)], backend=backend,
                                     temperature=0, progress_bar=True)
            dt, stats = time.monotonic() - t0, backend.reset_stats()
            print(f"batch: {len(states)} agents in {dt:.1f}s ({len(states) / dt:.2f} agents/s, "
                  f"{stats.completion_tokens / dt:.1f} generated tokens/s, "
                  f"{stats.cache_hit_rate:.0%} of prompt tokens from the prefix cache)")
    finally:
        backend.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Quickstart: five small DSL programs on the default model (what `make demo` runs).

    python examples/quickstart.py                                # in-process engine
    python examples/quickstart.py --url http://127.0.0.1:30000   # a running `sgl serve`

A chat turn, a select, a regex-constrained gen, a JSON-schema extraction and a fork/join. Every
section runs even if an earlier one failed; failures are listed at the end and the exit status is 1.
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from typing import Any, Callable

import sgl

PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "born": {"type": "integer"}, "city": {"type": "string"}},
    "required": ["name", "born", "city"],
    "additionalProperties": False,
}


@sgl.function
def chat_turn(s, question):
    s += sgl.system("You are a concise assistant.")
    s += sgl.user(question)
    s += sgl.assistant(sgl.gen("answer", max_tokens=40))


@sgl.function
def classify(s, review):
    s += sgl.user(f"Is this review positive or negative?\nReview: {review}")
    s += sgl.assistant("The review is " + sgl.select("label", choices=["positive", "negative"]))


@sgl.function
def phone_number(s, text):
    s += sgl.user(f"What is the phone number in this text?\n{text}")
    s += sgl.assistant("The phone number is " + sgl.gen("phone", regex=r"[0-9]{3}-[0-9]{3}-[0-9]{4}", max_tokens=16))


@sgl.function
def extract_person(s, text):
    s += sgl.system("Extract the person described by the user as JSON with keys name, born (the year) and city.")
    s += sgl.user(text)
    s += sgl.assistant(sgl.gen("person", json_schema=PERSON, max_tokens=48))


@sgl.function
def two_tips(s, topic):
    s += sgl.system("You give practical advice in one sentence.")
    s += sgl.user(f"Give me a tip about {topic}.")
    forks = s.fork(2)  # both branches share (and reuse the cached KV of) everything above
    for i, f in enumerate(forks):
        f += sgl.assistant(f"Tip {i + 1}:" + sgl.gen("tip", max_tokens=24, stop="\n"))
    forks.join()  # s["tip"] is now the list of both tips


def sections(opts: dict[str, Any]) -> list[tuple[str, Callable[[], str]]]:
    """The five demos; `opts` are sampling defaults for every gen (e.g. temperature=0)."""

    def chat() -> str:
        st = chat_turn.run(question="What is the capital of France?", **opts)
        return f"Q: What is the capital of France?\nA: {st['answer'].strip()}"

    def select() -> str:
        st = classify.run(review="Terrible service, I will never come back.", **opts)
        scores = st.get_meta_info("label")["normalized_prompt_logprobs"]
        return f"label: {st['label']}  (mean logprob per token: {', '.join(f'{x:.2f}' for x in scores)})"

    def regex() -> str:
        st = phone_number.run(text="Call Bob at 555-867-5309 after six.", **opts)
        return f"phone: {st['phone']}"

    def json_schema() -> str:
        st = extract_person.run(text="Marie Curie was born in Warsaw in 1867.", **opts)
        return f"person: {st['person']}\nparsed: {st.parsed('person')}"

    def fork_join() -> str:
        st = two_tips.run(topic="sleeping well", **opts)
        return "\n".join(f"tip {i + 1}:{t}" for i, t in enumerate(st["tip"]))

    return [("chat turn", chat), ("select", select), ("regex gen", regex), ("JSON schema", json_schema),
            ("fork/join", fork_join)]


def make_backend(url: str | None) -> Any:
    if url:
        return sgl.RuntimeEndpoint(url)
    t0 = time.monotonic()
    rt = sgl.Runtime(model_path="default", show_progress=False)
    print(f"loaded the default model in {time.monotonic() - t0:.1f}s")
    return rt


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", help="a running server (default: the in-process engine)")
    ap.add_argument("--temperature", type=float, default=0.0)
    args = ap.parse_args(argv)

    backend = make_backend(args.url)
    sgl.set_default_backend(backend)
    failures: list[str] = []
    total_tokens, total_time = 0, 0.0
    try:
        for title, fn in sections({"temperature": args.temperature}):
            print(f"\n=== {title} ===")
            before = backend.stats.completion_tokens
            t0 = time.monotonic()
            try:
                out = fn()
            except Exception as e:  # report and go on: the summary lists every failure
                failures.append(f"{title}: {type(e).__name__}: {e}")
                traceback.print_exc(limit=3)
                continue
            dt = time.monotonic() - t0
            n = backend.stats.completion_tokens - before
            total_tokens, total_time = total_tokens + n, total_time + dt
            print(out)
            print(f"[{n} tokens in {dt:.2f}s, {n / dt if dt else 0:.1f} tokens/s]")
        print(f"\ntotal: {total_tokens} generated tokens in {total_time:.1f}s "
              f"({total_tokens / total_time if total_time else 0:.1f} tokens/s), "
              f"{backend.stats.cache_hit_rate:.0%} of prompt tokens served from the prefix cache")
    finally:
        backend.shutdown()
    if failures:
        print("\nFAILED sections:\n  " + "\n  ".join(failures), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""DSL programs shared by the end-to-end tests (in-process Runtime and RuntimeEndpoint).

Small on purpose: every gen is 8-32 tokens, so the whole DSL e2e tier stays within a few minutes on
one CPU thread.
"""

from __future__ import annotations

import atexit
import functools
import json
import os
import sys
from typing import Any, Iterator

import sgl

GREEDY = {"temperature": 0}
PERSON = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
          "required": ["name", "age"]}


@sgl.function
def chat(s, question):
    s += sgl.system("You are a concise assistant.")
    s += sgl.user(question)
    s += sgl.assistant(sgl.gen("answer", max_tokens=16))


@sgl.function
def yes_no(s, question):
    s += sgl.user(question + " Answer yes or no.")
    s += sgl.assistant(sgl.select("verdict", choices=["yes", "no", "maybe"]))


@sgl.function
def constrained(s):
    s += sgl.user("Invent a person and a lucky number.")
    s += sgl.assistant("Lucky number: " + sgl.gen_int("number", max_tokens=6) + "\nPerson: "
                       + sgl.gen("person", json_schema=PERSON, max_tokens=32))


@sgl.function
def tips(s, topic):
    s += sgl.system("You give short tips.")
    s += sgl.user(f"Give one tip about {topic}.")
    forks = s.fork(3)
    forks += lambda i: sgl.assistant(f"Tip {i + 1}:" + sgl.gen("tip", max_tokens=12, stop="\n"))
    forks.join()
    s += sgl.user("Now say 'done'.")
    s += sgl.assistant(sgl.gen("end", max_tokens=8))


@sgl.function
def extract_name(s, doc):
    s += sgl.system("Reply with the person's name only.")
    s += sgl.user(doc)
    s += sgl.assistant(sgl.gen("name", max_tokens=8, stop="\n"))


DOCS = ["Marie Curie was a physicist born in Warsaw.", "Alan Turing worked on codebreaking at Bletchley.",
        "Ada Lovelace wrote the first program.", "Isaac Newton studied gravity."]


@functools.lru_cache(maxsize=1)
def shared_runtime() -> "sgl.Runtime":
    """One in-process engine for the whole test session (both DSL e2e modules use it)."""
    rt = sgl.Runtime(model_path="default", num_threads=1, max_total_tokens=8192, show_progress=False)
    atexit.register(rt.shutdown)
    return rt


def chosen_by_logprobs(generate: Any, encode: Any, prompt: str, choices: list[str]) -> tuple[str, list[float]]:
    """The select decision computed directly from /generate logprobs (the oracle for select tests).

    `generate(body) -> response` sends one native body; `encode(text) -> ids` tokenizes. For each
    choice: score the tokens of prompt + choice that differ from the prompt's own tokens (token
    healing), averaged.
    """
    p = encode(prompt)
    scores = []
    for c in choices:
        full = encode(prompt + c)
        k = 0
        while k < min(len(p), len(full)) and p[k] == full[k]:
            k += 1
        out = generate({"text": prompt + c, "sampling_params": {"max_new_tokens": 0}, "return_logprob": True,
                        "logprob_start_len": k})
        lps = [t[0] for t in out["meta_info"]["input_token_logprobs"]]
        scores.append(sum(lps) / len(lps))
    return choices[scores.index(max(scores))], scores


def run_example(args: list[str], timeout: float = 240.0) -> str:
    """Run `python examples/<script> ...` and return its stdout (asserting exit status 0)."""
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "TOKENIZERS_PARALLELISM": "false"}
    out = subprocess.run([sys.executable, *args], cwd=root, capture_output=True, text=True, timeout=timeout,
                         env=env, stdin=subprocess.DEVNULL)
    assert out.returncode == 0, f"{args} exited {out.returncode}\nstdout:\n{out.stdout[-3000:]}\nstderr:\n{out.stderr[-3000:]}"
    return out.stdout


def jsonl(path: str) -> Iterator[dict[str, Any]]:
    with open(path) as f:
        for line in f:
            yield json.loads(line)

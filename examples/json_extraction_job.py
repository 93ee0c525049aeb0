"""A batch job: extract a JSON record from every line of a text file, write JSONL, report validity.

    python examples/json_extraction_job.py                          # examples/data/people.txt, in-process
    python examples/json_extraction_job.py --input my.txt --output out.jsonl --limit 20
    python examples/json_extraction_job.py --url http://127.0.0.1:30000

`run_batch` runs the program over all lines concurrently (the runtime batches the requests) after
prefilling the program's constant prefix (system prompt and user-turn opening) once.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

import sgl

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "occupation": {"type": "string"},
        "city": {"type": "string"},
        "born": {"type": "integer"},
    },
    "required": ["name", "occupation", "city", "born"],
    "additionalProperties": False,
}
DEFAULT_INPUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "people.txt")


@sgl.function
def extract(s, line):
    s += sgl.system("You extract facts about a person as JSON with keys name, occupation, city and born "
                    "(the birth year). Use only facts stated in the text.")
    s += sgl.user(line)
    s += sgl.assistant(sgl.gen("record", json_schema=SCHEMA, max_tokens=64))


def is_valid(text: str) -> tuple[bool, Any]:
    """(valid against SCHEMA, parsed object or None)."""
    import jsonschema

    try:
        obj = json.loads(text)
        jsonschema.validate(obj, SCHEMA)
        return True, obj
    except (ValueError, jsonschema.ValidationError):
        return False, None


def run_job(lines: list[str], output: str, backend: Any, num_threads: Any = "auto",
            progress_bar: bool = True) -> dict[str, Any]:
    """Run the extraction over `lines`, write JSONL to `output`, return the report."""
    stats_before = getattr(backend, "stats", None)
    base = (stats_before.prompt_tokens, stats_before.cached_tokens, stats_before.completion_tokens) \
        if stats_before else (0, 0, 0)
    t0 = time.monotonic()
    states = extract.run_batch([{"line": ln} for ln in lines], backend=backend, temperature=0,
                               num_threads=num_threads, progress_bar=progress_bar)
    elapsed = time.monotonic() - t0
    valid = 0
    with open(output, "w") as f:
        for ln, st in zip(lines, states):
            ok, obj = is_valid(st["record"])
            valid += ok
            f.write(json.dumps({"line": ln, "record": obj, "raw": st["record"], "valid": ok}) + "\n")
    st = getattr(backend, "stats", None)
    prompt, cached, completion = ((st.prompt_tokens - base[0], st.cached_tokens - base[1],
                                   st.completion_tokens - base[2]) if st else (0, 0, 0))
    return {"documents": len(lines), "valid": valid, "seconds": elapsed, "docs_per_s": len(lines) / elapsed,
            "completion_tokens": completion, "tokens_per_s": completion / elapsed,
            "cache_hit_rate": cached / prompt if prompt else 0.0}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--input", default=DEFAULT_INPUT)
    ap.add_argument("--output", default="extracted.jsonl")
    ap.add_argument("--limit", type=int, default=None, help="only the first N lines")
    ap.add_argument("--url", help="a running server (default: the in-process engine)")
    ap.add_argument("--num-threads", default="auto")
    args = ap.parse_args(argv)

    with open(args.input) as f:
        lines = [ln.strip() for ln in f if ln.strip()][: args.limit]
    backend = sgl.RuntimeEndpoint(args.url) if args.url else sgl.Runtime(model_path="default", show_progress=False)
    try:
        threads = args.num_threads if args.num_threads == "auto" else int(args.num_threads)
        rep = run_job(lines, args.output, backend, threads)
    finally:
        backend.shutdown()
    print(f"{rep['documents']} documents -> {args.output}: {rep['valid']} valid records "
          f"({rep['valid'] / max(rep['documents'], 1):.0%}) in {rep['seconds']:.1f}s "
          f"({rep['docs_per_s']:.2f} docs/s, {rep['tokens_per_s']:.1f} generated tokens/s, "
          f"{rep['cache_hit_rate']:.0%} of prompt tokens from the prefix cache)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

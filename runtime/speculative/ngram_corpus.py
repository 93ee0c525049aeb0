"""NGRAM's corpus: text the model typically writes, matched after a request's own text and the finished
requests' (`--speculative-ngram-corpus`; REST's datastore, He et al. 2023). A chat model answers in its own
recurring phrases ("Here are some key things to know about", "1. **"), and a corpus of its own answers
holds them before any request has written them.

    sgl serve --model-path default --speculative-algorithm NGRAM --speculative-ngram-corpus default
    python -m sgl.runtime.speculative.ngram_corpus --out my-corpus.jsonl.gz [--model-path PATH] [--num-chat 960]

A corpus file is JSON lines, one {"text": ...} per sequence (gzip when the name ends in .gz); each text is
tokenized as a prompt is (special tokens such as the chat template's are read as such). `default` is the
corpus shipped for the default model (DEFAULT_CORPUS): the command above with its defaults, i.e. the model's
greedy answers to the self-distillation prompts of distill_data.py (chat turns and extractions; the
benchmark's questions and people are held out), each with its prompt.
"""

from __future__ import annotations

import argparse
import gzip
import json
import time
from pathlib import Path
from typing import IO, Callable, Optional

DEFAULT_CORPUS = Path(__file__).resolve().parent / "heads" / "smollm2-135m-instruct-ngram-corpus.jsonl.gz"


def corpus_path(spec: str, model_path: str) -> Path:
    """The file `--speculative-ngram-corpus` names: `default` is the shipped one (the default model only)."""
    if spec != "default":
        path = Path(spec)
        if not path.is_file():
            raise ValueError(f"speculative_ngram_corpus: no such file {spec!r}")
        return path
    if model_path != "default" or not DEFAULT_CORPUS.exists():
        raise ValueError(f"speculative_ngram_corpus 'default' is the default model's; for {model_path!r} give a "
                         "file (`python -m sgl.runtime.speculative.ngram_corpus --model-path ... --out FILE`)")
    return DEFAULT_CORPUS


def _open(path: Path, mode: str) -> IO[str]:
    return gzip.open(path, mode + "t", encoding="utf-8") if path.suffix == ".gz" else path.open(mode, encoding="utf-8")


def read_texts(path: Path) -> list[str]:
    texts = []
    with _open(path, "r") as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            try:
                text = json.loads(line)["text"]
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"speculative_ngram_corpus: {path} line {i + 1} is not a JSON object with "
                                 f"a \"text\" string ({e})") from None
            if not isinstance(text, str):
                raise ValueError(f"speculative_ngram_corpus: {path} line {i + 1}: \"text\" must be a string")
            texts.append(text)
    return texts


def load_corpus(path: Path, encode: Callable[[list[str]], list[list[int]]]) -> list[list[int]]:
    """The corpus's token sequences (`encode`: the tokenizer's batch encode, special tokens read as such)."""
    return encode(read_texts(path))


def write_corpus(out: Path, model_path: str = "default", num_chat: int = 960, num_extraction: int = 152,
                 max_new_tokens: int = 128, threads: Optional[int] = None, log: Callable[[str], None] = print) -> int:
    """The model's greedy answers to the self-distillation prompts (distill_data.DistillSpec), each after its
    prompt, as `out`; returns the number of answer tokens."""
    from sgl.runtime.engine import Engine
    from sgl.runtime.speculative.distill_data import DistillSpec

    spec = DistillSpec(model_path=model_path, num_chat=num_chat, num_extraction=num_extraction,
                       max_new_tokens=max_new_tokens)
    prompts = spec.prompts()
    t0 = time.monotonic()
    eng = Engine(model_path, max_running_requests=spec.batch_size, show_progress=False,
                 **({"num_threads": threads} if threads else {}))
    try:
        outs = eng.generate([p for p, _ in prompts], [params for _, params in prompts])
    finally:
        eng.shutdown()
    outs = outs if isinstance(outs, list) else [outs]
    out.parent.mkdir(parents=True, exist_ok=True)
    with _open(out, "w") as f:
        for (prompt, _), o in zip(prompts, outs):
            f.write(json.dumps({"text": prompt + o["text"]}, ensure_ascii=False) + "\n")
    n = sum(o["meta_info"]["completion_tokens"] for o in outs)
    log(f"ngram corpus: {len(outs)} answers, {n} tokens in {time.monotonic() - t0:.0f} s -> {out}")
    return n


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description="Write an NGRAM corpus: the model's own greedy answers (" + __doc__.split("(")[0].strip() + ")")
    p.add_argument("--out", required=True, help="the corpus file (.jsonl, or .jsonl.gz)")
    p.add_argument("--model-path", default="default")
    p.add_argument("--num-chat", type=int, default=960, help="chat prompts (distill_data.chat_prompts)")
    p.add_argument("--num-extraction", type=int, default=152, help="extraction prompts of each kind")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: the engine's)")
    a = p.parse_args(argv)
    write_corpus(Path(a.out), a.model_path, a.num_chat, a.num_extraction, a.max_new_tokens, a.threads)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

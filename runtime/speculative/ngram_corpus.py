"""NGRAM's corpus: text the model typically writes, a drafter lane after NGRAM's (`--speculative-ngram-corpus`;
REST's datastore, He et al. 2023). A chat model answers in its own recurring phrases ("Here are some key things
to know about", "1. **"), and a corpus of its own answers holds them before any request has written them.
Its own lane (CORPUS, scheduler/speculative_rows.py), not more matches inside NGRAM's: a corpus match is right
less often than the request copying itself (chat: 21% of drafted tokens vs 34%), and each lane learns its own
rate (chat, 1 thread, one probe: 1.22x as matches inside NGRAM's lane, 1.27x as a lane).

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
from typing import IO, Callable, Optional, Sequence

import numpy as np

from sgl.runtime.scheduler.request import Req
from sgl.runtime.speculative.drafter import Draft
from sgl.runtime.speculative.ngram import trie

DEFAULT_CORPUS = Path(__file__).resolve().parent / "heads" / "smollm2-135m-instruct-ngram-corpus.jsonl.gz"


_HASH_MUL = 0x9E3779B97F4A7C15  # an odd 64-bit multiplier: the n-gram hash is sum(t_j * M^(n-1-j)) mod 2^64
_MASK64 = (1 << 64) - 1


def _gram_hash(gram: Sequence[int]) -> int:
    h = 0
    for t in gram:
        h = (h * _HASH_MUL + t) & _MASK64
    return h


class CorpusIndex:
    """N-grams of the corpus. Per n-gram it keeps one occurrence for each of its `breadth` most frequent next
    tokens, most frequent first: a corpus repeats its phrases many times, and the likeliest continuation is the
    most common one, not the latest (NGRAM's indexes of the requests' text keep the latest).

    Arrays, not dicts (the default corpus adds ~40 MB to the process; its 177k n-grams as Python tuples, 130 MB):
    per n, the sorted 64-bit hashes of the corpus's n-grams and their kept ends; a lookup binary-searches the
    hash and checks the tokens (a hash collision never drafts another n-gram's continuation)."""

    def __init__(self, seqs: Sequence[Sequence[int]], min_n: int, max_n: int, breadth: int) -> None:
        parts = [np.asarray(list(seq) + [-1], dtype=np.int64) for seq in seqs if len(seq) >= min_n + 1]
        self.tokens = np.concatenate(parts) if parts else np.full(1, -1, dtype=np.int64)  # -1 ends a sequence
        self.tables: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # n -> (sorted hashes [U], ends [U, breadth] or -1)
        toks, length = self.tokens, len(self.tokens)
        for n in range(min_n, max_n + 1):
            if length <= n:
                continue
            ends = np.arange(n, length)
            h = np.zeros(len(ends), dtype=np.uint64)
            ok = toks[ends] >= 0  # a continuation's first token
            with np.errstate(over="ignore"):
                for j in range(n):
                    t = toks[ends - n + j]
                    ok &= t >= 0
                    h = h * np.uint64(_HASH_MUL) + t.astype(np.uint64)
            h, ends = h[ok], ends[ok]
            if not len(h):  # no sequence longer than n
                continue
            nxt = toks[ends]
            order = np.lexsort((nxt, h))  # group the (n-gram, next token) pairs
            h, nxt, ends = h[order], nxt[order], ends[order]
            first = np.flatnonzero(np.r_[True, (h[1:] != h[:-1]) | (nxt[1:] != nxt[:-1])])
            count = np.diff(np.r_[first, len(h)])
            ph, pend = h[first], ends[first]  # one end per pair: its first occurrence
            order = np.lexsort((-count, ph))  # per n-gram, its next tokens by frequency
            ph, pend = ph[order], pend[order]
            start = np.flatnonzero(np.r_[True, ph[1:] != ph[:-1]])
            rank = np.arange(len(ph)) - np.repeat(start, np.diff(np.r_[start, len(ph)]))
            keep = rank < breadth
            table = np.full((len(start), breadth), -1, dtype=np.int64)
            table[np.searchsorted(start, np.flatnonzero(keep), side="right") - 1, rank[keep]] = pend[keep]
            self.tables[n] = (ph[start], table)

    @property
    def num_tokens(self) -> int:
        return int((self.tokens >= 0).sum())

    def continuations(self, gram: tuple[int, ...], k: int) -> list[list[int]]:
        table = self.tables.get(len(gram))
        if table is None:
            return []
        keys, ends = table
        h = _gram_hash(gram)
        i = int(keys.searchsorted(np.uint64(h)))  # NOTE: a Python int above 2^63 would compare as a float
        if i == len(keys) or int(keys[i]) != h:
            return []
        out = []
        n = len(gram)
        for e in ends[i].tolist():
            if e < 0 or self.tokens[e - n:e].tolist() != list(gram):
                continue
            cont = self.tokens[e:e + k].tolist()
            out.append(cont[:cont.index(-1)] if -1 in cont else cont)
        return out


class CorpusDrafter:
    """Drafts the corpus's continuation of the request's last max_n..min_n tokens (the longest match; with
    max_breadth > 1 the continuations of its most frequent next tokens as one tree, as NGRAM's trie)."""

    name = "CORPUS"
    # a match here is a phrase the model often writes, not text the request copies: right less often than NGRAM's
    # (measured on chat: 21% of drafted tokens vs 33%), so its lane starts lower and learns per request
    accept_prior = 0.5

    def __init__(self, seqs: Sequence[Sequence[int]], min_n: int = 2, max_n: int = 4, max_breadth: int = 1) -> None:
        assert 1 <= min_n <= max_n and max_breadth >= 1
        self.min_n, self.max_n = min_n, max_n
        self.index = CorpusIndex(seqs, min_n, max_n, max_breadth)

    def propose(self, reqs: Sequence[Req], k: int) -> list[Draft]:
        out = []
        for req in reqs:
            tokens = req.fill_ids
            draft = Draft([])
            for n in range(min(self.max_n, len(tokens)), self.min_n - 1, -1):
                conts = [c for c in self.index.continuations(tuple(tokens[len(tokens) - n:]), k) if c]
                if conts:
                    draft = trie(conts, k)
                    break
            out.append(draft)
        return out


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
    eng = Engine(model_path, max_running_requests=spec.batch_size, show_progress=False, num_threads=threads)
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
    p = argparse.ArgumentParser(description="Write an NGRAM corpus (--speculative-ngram-corpus): the model's own "
                                            "greedy answers to the self-distillation prompts, each after its prompt")
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

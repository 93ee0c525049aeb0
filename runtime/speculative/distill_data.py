"""Self-distillation data for draft heads (EAGLE, MEDUSA): the target model writes its own answers.

No published heads exist for the default model and no hub is reachable, so heads learn from text the
target generates itself (greedy, as the benchmark decodes) for prompts from a shipped corpus:
  - chat turns: question templates x topics (below; the benchmark's "What should a ROLE know about
    TOPIC?" questions are held out: none of these templates is that one),
  - extraction: people of examples/data/people.txt from line 48 on (lines 0-47 are the benchmark's
    (a) documents and (c) people), both free-form and constrained by the 6-field person schema.

The engine records, per position j of each sequence (prompt + answer, as it computes them: no second
forward pass; StateRecorder):
    tokens[j]  the token,
    hidden[j]  the target's last hidden state (final-normed, what its lm_head reads) [H] fp16,
    argmax[j]  the target's greedy next token at j (= tokens[j + 1] inside the answer; under a grammar
               the masked choice, which is what verification accepts).
The answer's last token is never fed back (nor are forced tokens that end a constrained answer), so a
sequence ends at its last computed position, whose argmax is the token after it.
The whole set is one safetensors file under ~/.cache/sgl/distill/ (or $SGL_CACHE_DIR/distill/), keyed
by a hash of the model file, the prompts, the generation settings and FORMAT_VERSION, so a rerun of
the training command skips generation.

    >>> len(chat_prompts(12)), chat_prompts(2)[0].startswith("<|im_start|>user")
    (12, True)
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

FORMAT_VERSION = 2  # 2: states captured during generation, answer argmax = the produced token
ROOT = Path(__file__).resolve().parents[2]
DATA_DIR = ROOT / "examples" / "data"
HELD_OUT_PEOPLE = 48  # people.txt lines the benchmark uses (bench_speculative.py workloads (a) and (c))

TEMPLATES = [
    "Explain {t} to a beginner in a few sentences.",
    "Give me three practical tips about {t}.",
    "Write a short paragraph about {t}.",
    "What are common mistakes people make with {t}?",
    "Why is {t} important? Answer briefly.",
    "Describe a typical day that involves {t}.",
    "Write a short story about someone learning {t}.",
    "List the pros and cons of {t}.",
    "How do I get started with {t}?",
    "Tell me some interesting facts about {t}.",
    "What is the most important thing to understand about {t}?",
    "Summarize the history of {t} in a few sentences.",
    "How would you explain {t} to a ten-year-old?",
    "What questions do people often ask about {t}?",
    "Give a step-by-step guide related to {t}.",
    "Compare {t} with something similar and explain the difference.",
]
# NOTE: a second set, after the first in chat_prompts' order, so that a prefix of up to 2,160 prompts (the shipped
# NGRAM corpus, the first heads' data) is what it was
MORE_TEMPLATES = [
    "What are the benefits of {t}?",
    "Give me a quick overview of {t}.",
    "Write a short blog post introduction about {t}.",
    "What are five key facts about {t}?",
    "How has {t} changed over time?",
    "What tools or resources help with {t}?",
    "Explain the basics of {t} in simple terms.",
    "What are some fun activities related to {t}?",
    "What is a common myth about {t}?",
    "Write a haiku about {t}.",
    "Give advice to a friend who is interested in {t}.",
    "What are the main challenges of {t}?",
    "Describe {t} in three sentences.",
    "Why do people enjoy {t}?",
    "What would the world be like without {t}?",
    "Create a short quiz with answers about {t}.",
]
TOPICS = [
    "photosynthesis", "the water cycle", "volcanoes", "the solar system", "electric cars", "recycling",
    "healthy breakfast", "writing emails", "job interviews", "budgeting", "meditation", "yoga",
    "chess", "playing the guitar", "baking bread", "growing tomatoes", "camping", "swimming",
    "painting with watercolors", "learning to code", "Python lists", "databases", "the internet",
    "climate change", "honey bees", "the Roman empire", "ancient Egypt", "the moon landing",
    "dinosaurs", "rainbows", "earthquakes", "coffee", "tea", "dogs", "cats", "birds in winter",
    "friendship", "teamwork", "reading books", "museums", "trains", "airports", "the ocean",
    "mountains", "snow", "summer holidays", "birthday parties", "music festivals", "soccer",
    "basketball", "marathons", "vitamins", "drinking water", "washing hands", "smartphones",
    "social media", "passwords", "robots", "electricity", "magnets", "gravity", "the human heart",
    "knitting", "photography", "bird watching", "hiking boots", "solar panels", "wind turbines",
    "the stock market", "credit cards", "renting an apartment", "moving to a new city", "email etiquette",
    "video games", "board games", "the piano", "jazz", "opera", "poetry", "novels", "libraries",
    "the printing press", "the Industrial Revolution", "the Renaissance", "castles", "pyramids",
    "rain forests", "deserts", "glaciers", "hurricanes", "tornadoes", "the immune system", "the brain",
    "bones", "teeth", "nutrition labels", "vegetarian cooking", "pizza", "chocolate", "spices",
    "fermentation", "bicycles", "airplanes", "ships", "bridges", "skyscrapers", "3D printing",
    "artificial intelligence", "spreadsheets", "web browsers", "cloud storage", "backups",
    "keyboards", "batteries", "light bulbs", "telescopes", "microscopes", "atoms", "chemistry",
    "fractions", "geometry", "probability", "maps", "volunteering", "parenting", "pets", "horses",
    "whales", "sharks", "ants", "mushrooms", "trees", "flowers", "compost", "the seasons",
]


def chat(user: str) -> str:
    """The default model's chat turn (its template without a system prompt, as the benchmark writes it)."""
    return f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"


def chat_prompts(n: int) -> list[str]:
    """n chat prompts: every TEMPLATES x topic pair in a fixed shuffled order (a prefix of it mixes all those
    templates and topics), then every MORE_TEMPLATES x topic pair, shuffled the same way."""
    qs: list[str] = []
    for templates in (TEMPLATES, MORE_TEMPLATES):
        part = [tpl.format(t=t) for t in TOPICS for tpl in templates]
        random.Random(0).shuffle(part)
        qs += part
    return [chat(q) for q in qs[:n]]


def extraction_prompts(n: int) -> tuple[list[str], list[str]]:
    """(free-form, schema-constrained) prompts over people not used by the benchmark, n of each at most."""
    people = (DATA_DIR / "people.txt").read_text().splitlines()[HELD_OUT_PEOPLE:][:n]
    free = [chat("List the facts about this person as JSON with the keys name, job, city and born.\n\n" + p)
            for p in people]
    constrained = [chat("Extract the person as JSON: " + p) for p in people]
    return free, constrained


@dataclass(frozen=True)
class DistillSpec:
    """What to generate (about 400k tokens with the defaults). `batch_size` requests decode at once, with
    `cpu_act_quant` activations (q8: the fastest CPU path, 1.7x q16's tokens per second at batch 64 on 2 threads;
    its states are what a q8 engine's head reads) on `threads` torch threads (not part of the data: every row
    gets the same bits on any thread count)."""

    model_path: str = "default"
    num_chat: int = 2900
    num_extraction: int = 152  # of each kind (people.txt lines 48-199: all the held-in people)
    max_new_tokens: int = 128
    batch_size: int = 64
    cpu_act_quant: str = "q8"
    threads: Optional[int] = None

    def prompts(self) -> list[tuple[str, dict[str, Any]]]:
        greedy = {"temperature": 0.0, "max_new_tokens": self.max_new_tokens}
        free, constrained = extraction_prompts(self.num_extraction)
        schema = json.loads((DATA_DIR / "person_extraction.json").read_text())["schema"]
        out = [(p, greedy) for p in chat_prompts(self.num_chat) + free]
        out += [(p, {**greedy, "json_schema": json.dumps(schema)}) for p in constrained]
        return out


@dataclass
class DistillData:
    """Sequences concatenated: sequence s is rows offsets[s]:offsets[s+1]; its first prompt_lens[s] rows
    are the prompt."""

    tokens: torch.Tensor  # [N] int64
    hidden: torch.Tensor  # [N, H] float16: the target's final-normed hidden state at each position
    argmax: torch.Tensor  # [N] int64: the target's greedy next token at each position
    offsets: torch.Tensor  # [S + 1] int64
    prompt_lens: torch.Tensor  # [S] int64

    @property
    def num_sequences(self) -> int:
        return len(self.prompt_lens)

    def sequence(self, s: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        a, b = int(self.offsets[s]), int(self.offsets[s + 1])
        return self.tokens[a:b], self.hidden[a:b], self.argmax[a:b]

    def save(self, path: Path, meta: dict[str, str]) -> None:
        from safetensors.torch import save_file

        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file({"tokens": self.tokens, "hidden": self.hidden, "argmax": self.argmax, "offsets": self.offsets,
                   "prompt_lens": self.prompt_lens}, str(tmp), metadata=meta)
        os.replace(tmp, path)  # NOTE: atomic: an interrupted run never leaves a truncated cache file

    @classmethod
    def load(cls, path: Path) -> "DistillData":
        from safetensors.torch import load_file

        t = load_file(str(path))
        return cls(t["tokens"].long(), t["hidden"], t["argmax"].long(), t["offsets"].long(), t["prompt_lens"].long())


def draft_vocabulary(data: DistillData, size: int, vocab_size: int) -> torch.Tensor:
    """A draft head's vocabulary (EAGLE's d2t, MEDUSA's): the `size` target ids the data holds most often, as the
    target's choices and as text (sorted ascending), [size] int64; the whole vocabulary when size <= 0 or >= it."""
    if size <= 0 or size >= vocab_size:
        return torch.arange(vocab_size)
    counts = torch.bincount(data.argmax, minlength=vocab_size) + torch.bincount(data.tokens, minlength=vocab_size)
    return counts.topk(size).indices.sort().values


def cache_dir() -> Path:
    return Path(os.environ.get("SGL_CACHE_DIR") or Path.home() / ".cache" / "sgl") / "distill"


def cache_key(spec: DistillSpec, resolved_model: str) -> str:
    st = os.stat(resolved_model) if os.path.isfile(resolved_model) else None
    ident = {"v": FORMAT_VERSION, "model": os.path.abspath(resolved_model),
             "size": st.st_size if st else None, "mtime": int(st.st_mtime) if st else None,
             "prompts": spec.prompts(), "max_new_tokens": spec.max_new_tokens, "act": spec.cpu_act_quant}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


def load_or_generate(spec: DistillSpec, log: Callable[[str], None] = print,
                     path: Optional[Path] = None) -> DistillData:
    """The cached data set for `spec`, generating it first when missing."""
    from sgl.runtime.models.default_model import resolve_model_path

    resolved = resolve_model_path(spec.model_path)
    path = path or cache_dir() / f"{cache_key(spec, resolved)}.safetensors"
    if path.exists():
        log(f"distillation data: cached {path}")
        return DistillData.load(path)
    data = generate(spec, log)
    data.save(path, {"model": resolved, "format_version": str(FORMAT_VERSION)})
    log(f"distillation data: {len(data.tokens)} tokens in {data.num_sequences} sequences -> {path}")
    return data


def generate(spec: DistillSpec, log: Callable[[str], None] = print) -> DistillData:
    """Greedy answers from the engine, every prompt in flight at once (continuous batching keeps
    `batch_size` rows decoding), with the states captured as the engine computes them (StateRecorder):
    no second forward pass over the sequences."""
    from sgl.runtime.engine import Engine

    prompts = spec.prompts()
    t0 = time.monotonic()
    # NOTE: no radix cache: a cached prefix is not recomputed, so its positions would have no state
    eng = Engine(spec.model_path, max_running_requests=spec.batch_size, show_progress=False,
                 disable_radix_cache=True, cpu_act_quant=spec.cpu_act_quant, num_threads=spec.threads)
    try:
        runner = eng.scheduler.runner
        recorder = StateRecorder(runner.model, lambda n: log(
            f"distillation data: {n}/{len(prompts)} requests started ({time.monotonic() - t0:.0f} s)"))
        runner.capture_hidden = True
        runner.hidden_observer = recorder.observe
        outs = eng.generate([p for p, _ in prompts], [params for _, params in prompts])
        outs = outs if isinstance(outs, list) else [outs]
        log(f"distillation data: generated {len(outs)} answers with their states ({time.monotonic() - t0:.0f} s)")
        data = recorder.data([o["meta_info"]["id"] for o in outs])
    finally:
        eng.shutdown()
    return data


class StateRecorder:
    """Files the states the runner computes (ModelRunner.hidden_observer) by request and position.

    A row computes its request's tokens at positions start .. start + kept - 1 (RowResult.hidden_states:
    [kept, H]); a position computed again (a preempted request's recompute) keeps the newer state. Every
    position of prompt + answer is computed except the answer's last token (never fed back) and forced
    tokens that end a constrained answer, so a sequence is filed up to its last computed position, whose
    greedy choice is the token after it.
    argmax: inside the answer, the token the engine produced next (under a grammar, the masked choice:
    what verification accepts); at prompt positions, the target's argmax over its logits (computed
    here from the prefill states, the one lm_head pass this adds)."""

    def __init__(self, model: Any, progress: Optional[Callable[[int], None]] = None) -> None:
        self.model = model
        self.progress = progress  # called with the number of requests seen, at every 64th
        self.states: dict[str, dict[int, torch.Tensor]] = {}  # rid -> position -> [H] float16
        self.prompt_argmax: dict[str, dict[int, int]] = {}  # rid -> prompt position -> argmax
        self.reqs: dict[str, Any] = {}  # rid -> the Req (its prompt_ids and, once finished, output_ids)

    @torch.inference_mode()
    def observe(self, rows: list[Any], results: list[Any]) -> None:
        for row, res in zip(rows, results):
            if res.hidden_states is None:
                continue
            req = row.req
            if req.rid not in self.states:
                self.states[req.rid], self.prompt_argmax[req.rid], self.reqs[req.rid] = {}, {}, req
                if self.progress is not None and len(self.reqs) % 64 == 0:
                    self.progress(len(self.reqs))
            by_pos = self.states[req.rid]
            hid = res.hidden_states.to(torch.float16)
            for i in range(hid.shape[0]):
                by_pos[row.start + i] = hid[i]
            # prompt positions before the last one: their greedy choice is not an answer token
            n_prompt = min(hid.shape[0], len(req.prompt_ids) - 1 - row.start)
            if n_prompt > 0:
                am = self.model.compute_logits(res.hidden_states[:n_prompt]).argmax(-1).tolist()
                for i, a in enumerate(am):
                    self.prompt_argmax[req.rid][row.start + i] = a

    def data(self, rids: list[str]) -> DistillData:
        """The data set of the finished requests `rids`, in that order."""
        tokens: list[int] = []
        argmax: list[int] = []
        hidden, lens, prompt_lens = [], [], []
        for rid in rids:
            prompt, answer = list(self.reqs[rid].prompt_ids), list(self.reqs[rid].output_ids)
            fill, by_pos, pam = prompt + answer, self.states[rid], self.prompt_argmax[rid]
            n = 0  # positions with a state, from 0 (the answer's last token, and forced tokens that ended
            while n < len(fill) - 1 and n in by_pos:  # the request after jump-forward, were never fed)
                n += 1
            assert n >= len(prompt), f"request {rid}: no state at prompt position {n}"
            tokens += fill[:n]
            hidden.append(torch.stack([by_pos[j] for j in range(n)]))
            argmax += [pam[j] for j in range(len(prompt) - 1)] + fill[len(prompt):n + 1]
            lens.append(n)
            prompt_lens.append(len(prompt))
        lens_t = torch.tensor(lens, dtype=torch.int64)
        return DistillData(
            tokens=torch.tensor(tokens, dtype=torch.int64), hidden=torch.cat(hidden),
            argmax=torch.tensor(argmax, dtype=torch.int64),
            offsets=torch.cat([torch.zeros(1, dtype=torch.int64), lens_t.cumsum(0)]),
            prompt_lens=torch.tensor(prompt_lens, dtype=torch.int64))


@torch.inference_mode()
def record_states(model: Any, config: Any, seqs: list[tuple[list[int], list[int]]],
                  tokens_per_batch: int = 2048) -> DistillData:
    """Run `model` over each prompt + answer (a scratch KV pool) and keep every position's state."""
    from sgl.runtime.executor.forward_batch import ForwardBatch
    from sgl.runtime.executor.kv_cache import KVCache

    full = [p + o for p, o in seqs]
    longest = max(len(s) for s in full)
    pool = max(tokens_per_batch, longest)
    kv = KVCache.for_model(config, pool, torch.float32, "cpu")
    hidden_parts, argmax_parts = [], []
    i = 0
    while i < len(full):
        batch, used = [], 0
        while i < len(full) and (not batch or used + len(full[i]) <= pool):
            batch.append(full[i])
            used += len(full[i])
            i += 1
        tables, start = [], 0
        for s in batch:
            tables.append(list(range(start, start + len(s))))
            start += len(s)
        fb = ForwardBatch.from_lists(batch, tables)
        h = model(fb, kv)  # [T, H]
        hidden_parts.append(h.to(torch.float16))
        argmax_parts.append(model.compute_logits(h).argmax(-1))
    lens = torch.tensor([len(s) for s in full], dtype=torch.int64)
    return DistillData(
        tokens=torch.tensor([t for s in full for t in s], dtype=torch.int64),
        hidden=torch.cat(hidden_parts), argmax=torch.cat(argmax_parts).long(),
        offsets=torch.cat([torch.zeros(1, dtype=torch.int64), lens.cumsum(0)]),
        prompt_lens=torch.tensor([len(p) for p, _ in seqs], dtype=torch.int64))

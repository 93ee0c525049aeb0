"""A tiny deterministic stand-in for the runtime, for frontend unit tests only.

It speaks the native /generate body and response shapes exactly (it is a `NativeBackend`), so the
whole frontend path above the transport is exercised: gen, select with token healing, prefill,
batching, streaming. Its "model":
- tokenizer: greedy longest match over a few multi-character tokens, else one token per character;
- logprob(token | previous token) = a fixed hash of the pair, in [-5, 0);
- greedy text: characters of SCRIPT from an offset set by the prompt; constrained requests return
  `constrained[kind]`;
- a prefix cache: `cached_tokens` is the longest token prefix shared with any earlier prompt.
Every body it receives is recorded in `requests` (thread-safe), with the time it arrived.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Iterator, Optional

from sgl.backends.native import NativeBackend
from sgl.chat_template import ChatTemplate
from sgl.runtime.protocol import RequestError, SamplingParams

SCRIPT = "lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor "
MULTI = ["<|im_start|>", "<|im_end|>", " positive", " negative", " yes", " no", " the", " answer", " is",
         " cat", " dog", "ab"]
BASE = 100_000  # ids of MULTI tokens start here; single characters use ord(c)

# SmolLM2's template shape: chatml with a default system prompt before a first non-system turn.
SMOL_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def tokenize(text: str) -> list[int]:
    ids, i = [], 0
    while i < len(text):
        for j, tok in enumerate(MULTI):
            if text.startswith(tok, i):
                ids.append(BASE + j)
                i += len(tok)
                break
        else:
            ids.append(ord(text[i]))
            i += 1
    return ids


def detok(tid: int) -> str:
    return MULTI[tid - BASE] if tid >= BASE else chr(tid)


def logprob(prev: int, tok: int) -> float:
    return -((prev * 7919 + tok * 104729) % 1000) / 200.0 - 0.01


class FakeBackend(NativeBackend):
    def __init__(self, latency: float = 0.0, stream_delay: float = 0.0) -> None:
        super().__init__()
        self.latency = latency
        self.stream_delay = stream_delay
        self.requests: list[dict[str, Any]] = []
        self.batches: list[int] = []  # size of each _generate call
        self.constrained = {"regex": "42", "json_schema": '{"name": "Ada", "age": 36}', "ebnf": "ok"}
        self.fail_on: Optional[str] = None  # a substring of a prompt that makes the request fail
        self._seen: list[list[int]] = []
        self._lock = threading.Lock()
        self.template = ChatTemplate.from_jinja(SMOL_TEMPLATE, name="fake-smol")

    def get_chat_template(self) -> ChatTemplate:
        return self.template

    # ---- transport -----------------------------------------------------------------------------------
    def _generate(self, bodies: list[dict[str, Any]]) -> list[Any]:
        with self._lock:
            self.batches.append(len(bodies))
        if self.latency:
            time.sleep(self.latency)
        outs = []
        for b in bodies:
            n = (b.get("sampling_params") or {}).get("n", 1)
            res = [self._one(b, i) for i in range(n)]
            outs.append(res if n > 1 else res[0])
        return outs

    def _generate_stream(self, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
        final = self._one(body, 0)
        text = final["text"]
        for k in range(1, len(text) + 1):
            if self.stream_delay:
                time.sleep(self.stream_delay)
            yield {**final, "text": text[:k], "meta_info": {**final["meta_info"], "finish_reason": None}}
        yield final

    def _one(self, body: dict[str, Any], index: int) -> dict[str, Any]:
        sp = SamplingParams.from_dict(body.get("sampling_params"))  # validates like the server: 400 on bad input
        with self._lock:
            self.requests.append({**body, "_t": time.monotonic()})
        if "input_ids" in body:
            ids = list(body["input_ids"])
        else:
            text = body["text"]
            if self.fail_on and self.fail_on in text:
                raise RequestError(f"fake: refusing a prompt containing {self.fail_on!r}")
            ids = tokenize(text)
        with self._lock:
            cached = max((_common(ids, s) for s in self._seen), default=0)
            self._seen.append(ids)
        out_text, finish = self._complete(body.get("text", ""), sp)
        out_ids = tokenize(out_text)
        meta: dict[str, Any] = {"id": f"fake-{len(self.requests)}", "finish_reason": finish,
                                "prompt_tokens": len(ids), "completion_tokens": len(out_ids),
                                "cached_tokens": min(cached, len(ids) - 1), "e2e_latency": 0.0}
        if body.get("return_logprob"):
            start = body.get("logprob_start_len", -1)
            meta["input_token_logprobs"] = [] if start == -1 else [
                [None if j == 0 else logprob(ids[j - 1], ids[j]), ids[j], detok(ids[j])]
                for j in range(start, len(ids))]
            prev = ids[-1]
            meta["output_token_logprobs"] = []
            for t in out_ids:
                meta["output_token_logprobs"].append([logprob(prev, t), t, detok(t)])
                prev = t
        return {"text": out_text, "output_ids": out_ids, "meta_info": meta}

    def _complete(self, prompt: str, sp: SamplingParams) -> tuple[str, dict[str, Any]]:
        if sp.max_new_tokens == 0:
            return "", {"type": "length", "length": 0}
        if sp.constraint is not None:
            return self.constrained.get(sp.constraint[0], "x"), {"type": "stop", "matched": 0}
        start = len(prompt) % len(SCRIPT)
        text = (SCRIPT[start:] + SCRIPT * 10)[: sp.max_new_tokens]
        hits = [(text.find(s), s) for s in sp.stop or [] if s in text]
        if hits:
            at, s = min(hits)
            return text[:at], {"type": "stop", "matched": s}
        return text, {"type": "length", "length": sp.max_new_tokens}


def _common(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n

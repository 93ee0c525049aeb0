"""The logic shared by backends that speak SGLang's native /generate API (in-process or HTTP).

A subclass only moves request bodies: `_generate(bodies) -> responses` and `_generate_stream(body)
-> cumulative responses`, both in the exact JSON shapes of DESIGN.md. Everything else (gen, select
with token healing, prefix prefill, token accounting) is written once, here.

Select, step by step (all with temperature 0, `max_new_tokens` 0, i.e. prefill only):
  1. `{text: prompt}`: puts the prompt's KV in the radix cache and returns its length P in tokens.
  2. one batch: `prompt` and `prompt + choice` for every choice, each with `return_logprob` and
     `logprob_start_len = P - 2`. Every item hits the cached prompt, so only the choice tokens (and
     the last two prompt tokens) are computed. Token healing: tokenizing `prompt + choice` may merge
     the prompt's last token with the choice's first (a trailing space, say); comparing each item's
     token ids with the bare prompt's from position P - 2 finds where the choice really starts, and
     only the choice's own tokens are scored.
  3. (unconditional_likelihood_normalized only) the choice's tokens after a one-token context.
"""

from __future__ import annotations

import math
import random
import threading
from dataclasses import dataclass
from typing import Any, Iterator, Optional

from sgl.backends.base import Backend, BackendError, GenResult, Prompt
from sgl.choices import ChoicesDecision, ChoicesSamplingMethod, mean_logprob
from sgl.sampling import GenParams

Body = dict[str, Any]
Response = Any  # a dict, or a list of dicts for a body with n > 1


@dataclass
class TokenStats:
    """Totals over every request this backend sent (for throughput and cache-hit reports)."""

    requests: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0

    @property
    def cache_hit_rate(self) -> float:
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0


class NativeBackend(Backend):
    def __init__(self) -> None:
        self.stats = TokenStats()
        self._stats_lock = threading.Lock()

    # ---- transport: implemented by subclasses ---------------------------------------------------
    def _generate(self, bodies: list[Body]) -> list[Response]:
        raise NotImplementedError

    def _generate_stream(self, body: Body) -> Iterator[dict[str, Any]]:
        raise NotImplementedError

    # ---- helpers --------------------------------------------------------------------------------
    def send(self, bodies: list[Body]) -> list[Response]:
        """Send request bodies (as one batch where the transport allows); count their tokens."""
        outs = self._generate(bodies)
        flat = [o for out in outs for o in (out if isinstance(out, list) else [out])]
        for o in flat:
            raise_if_aborted(o)
        self._count(flat)
        return outs

    def _count(self, outs: list[dict[str, Any]]) -> None:
        with self._stats_lock:
            for o in outs:
                mi = o.get("meta_info", {})
                self.stats.requests += 1
                self.stats.prompt_tokens += int(mi.get("prompt_tokens") or 0)
                self.stats.cached_tokens += int(mi.get("cached_tokens") or 0)
                self.stats.completion_tokens += int(mi.get("completion_tokens") or 0)

    def reset_stats(self) -> TokenStats:
        with self._stats_lock:
            old, self.stats = self.stats, TokenStats()
        return old

    @staticmethod
    def body(text: str, params: GenParams) -> Body:
        return {"text": text, "sampling_params": params.to_sampling_params(), **params.request_options()}

    # ---- the Backend interface ---------------------------------------------------------------------
    def generate(self, prompt: Prompt, params: GenParams) -> GenResult:
        [out] = self.send([self.body(prompt.text, params)])
        if isinstance(out, list):  # n > 1
            return GenResult([o["text"] for o in out], [o["meta_info"] for o in out])
        return GenResult(out["text"], out["meta_info"])

    def generate_stream(self, prompt: Prompt, params: GenParams) -> Iterator[GenResult]:
        if params.n not in (None, 1):
            raise ValueError("gen: streaming supports n = 1 only")
        last: Optional[dict[str, Any]] = None
        for chunk in self._generate_stream({**self.body(prompt.text, params), "stream": True}):
            raise_if_aborted(chunk)
            last = chunk
            yield GenResult(chunk["text"], chunk["meta_info"])
        if last is not None:
            self._count([last])

    def prefill(self, texts: list[str]) -> None:
        bodies = [{"text": t, "sampling_params": {"max_new_tokens": 0}} for t in texts if t]
        if bodies:
            self.send(bodies)

    def select(self, prompt: Prompt, choices: list[str], temperature: float,
               method: ChoicesSamplingMethod, model: Optional[str] = None,
               lora_path: Optional[str] = None) -> ChoicesDecision:
        if not prompt.text:
            raise ValueError("select: the program has no text before the select to condition on")
        adapter = {"lora_path": lora_path} if lora_path is not None else {}
        on = {"model": model} if model is not None else {}  # every scoring request on the same model
        [pre] = self.send([{"text": prompt.text, "sampling_params": {"max_new_tokens": 0}, **on, **adapter}])
        start = max(int(pre["meta_info"]["prompt_tokens"]) - 2, 0)
        if model is not None:  # "auto": score every choice on the model the router picked for the prompt
            on = {"model": pre["meta_info"].get("model", model)}
        on.update(adapter)
        scoring = {"sampling_params": {"max_new_tokens": 0, "temperature": 0}, "return_logprob": True,
                   "return_text_in_logprobs": True, "logprob_start_len": start, **on}
        outs = self.send([{"text": prompt.text + c, **scoring} for c in [""] + choices])
        tail_ids = [t[1] for t in outs[0]["meta_info"]["input_token_logprobs"]]
        windows = [o["meta_info"]["input_token_logprobs"] for o in outs[1:]]
        starts = [_choice_start(w, tail_ids) for w in windows]
        per_choice = [w[k:] for w, k in zip(windows, starts)]  # [num_choices][choice tokens] triples
        normalized = [mean_logprob(t) for t in per_choice]
        uncond = self._unconditional(windows, starts, on) if method.requires_unconditional_logprobs else None
        decision = method(choices=choices, normalized_prompt_logprobs=normalized, input_token_logprobs=per_choice,
                          output_token_logprobs=[o["meta_info"].get("output_token_logprobs") or [] for o in outs[1:]],
                          unconditional_token_logprobs=uncond)
        if temperature > 1e-6:
            decision = _sample(choices, normalized, temperature, decision)
        return decision

    def _unconditional(self, windows: list[list[Any]], starts: list[int], on: Optional[dict[str, str]] = None) -> list[list[Any]]:
        """Logprobs of each choice's tokens after only the token before it (no real prompt).

        NOTE: SGLang sends the bare choice tokens, whose first token then has no logprob (and a
        one-token choice none at all); one token of context keeps every choice token scored.
        """
        bodies, lengths = [], []
        for w, k in zip(windows, starts):
            ids = [t[1] for t in w[max(k - 1, 0):]]
            lengths.append(len(w) - k)
            bodies.append({"input_ids": ids, "sampling_params": {"max_new_tokens": 0}, "return_logprob": True,
                           "return_text_in_logprobs": True, "logprob_start_len": 0, **(on or {})})
        outs = self.send(bodies)
        return [o["meta_info"]["input_token_logprobs"][-n:] if n else [] for o, n in zip(outs, lengths)]


def raise_if_aborted(out: dict[str, Any]) -> None:
    """A request that ended with finish_reason "abort" (a grammar that failed to compile, the engine
    shutting down, ...) is an error for the program, not an empty result."""
    fr = (out.get("meta_info") or {}).get("finish_reason")
    if isinstance(fr, dict) and fr.get("type") == "abort":
        raise BackendError(f"request aborted: {fr.get('message')}")


def _choice_start(window: list[Any], tail_ids: list[int]) -> int:
    """Index in `window` (prompt + choice tokens from position P - 2) where the choice's tokens begin:
    the first position whose token differs from the bare prompt's (token healing), else after it."""
    k = 0
    while k < len(tail_ids) and k < len(window) and window[k][1] == tail_ids[k]:
        k += 1
    return k


def _sample(choices: list[str], scores: list[float], temperature: float, decision: ChoicesDecision) -> ChoicesDecision:
    """select(temperature > 0): sample a choice with probability softmax(score / temperature)."""
    finite = [s for s in scores if s != float("-inf")]
    top = max(finite) if finite else 0.0
    weights = [math.exp((s - top) / temperature) if s != float("-inf") else 0.0 for s in scores]
    if sum(weights) == 0:
        return decision
    pick = random.choices(range(len(choices)), weights=weights)[0]
    return ChoicesDecision(choices[pick], {**decision.meta_info, "sampled_with_temperature": temperature})

"""Per-request sampling state that lives across decode steps: params, the row's own generator, and
the token statistics penalties need, kept in sync incrementally by `append`.

    >>> from sgl.runtime.protocol import SamplingParams
    >>> st = RowSamplingState.create(SamplingParams(sampling_seed=7, frequency_penalty=0.5), [1, 2], frozenset({0}))
    >>> st.append(5); st.append(5)
    >>> st.output_counts.ids().tolist(), st.output_counts.counts().tolist()
    ([5], [2.0])
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Optional

import numpy as np
import torch

from sgl.runtime.protocol import SamplingParams

_SEED_MOD = 2**64  # torch.Generator.manual_seed accepts [0, 2^64)


class TokenCounter:
    """Distinct token ids and their counts, updated in O(1) per token.

    `ids()` / `counts()` are tensors sharing memory with the first `len(self)` entries, in order of
    first appearance (numpy storage: element writes cost ~0.1 us, a torch element write ~5 us).
    """

    def __init__(self, tokens: Iterable[int] = (), capacity: int = 64) -> None:
        self._pos: dict[int, int] = {}  # token id -> index into _ids / _counts
        self._ids = np.empty(capacity, dtype=np.int64)
        self._counts = np.zeros(capacity, dtype=np.float32)
        uniq, counts = np.unique(np.asarray(list(tokens), dtype=np.int64), return_counts=True)
        if len(uniq):
            self._grow(len(uniq))
            self._ids[: len(uniq)] = uniq
            self._counts[: len(uniq)] = counts
            self._pos = {t: i for i, t in enumerate(uniq.tolist())}

    def __len__(self) -> int:
        return len(self._pos)

    def __contains__(self, token_id: int) -> bool:
        return token_id in self._pos

    def add(self, token_id: int) -> None:
        i = self._pos.get(token_id)
        if i is None:
            i = len(self._pos)
            self._grow(i + 1)
            self._pos[token_id] = i
            self._ids[i] = token_id
            self._counts[i] = 0.0
        self._counts[i] += 1.0

    def ids(self) -> torch.Tensor:
        return torch.from_numpy(self._ids[: len(self._pos)])  # [U] long

    def counts(self) -> torch.Tensor:
        return torch.from_numpy(self._counts[: len(self._pos)])  # [U] float32, each >= 1

    def _grow(self, size: int) -> None:
        if size <= self._ids.shape[0]:
            return
        cap = max(size, 2 * self._ids.shape[0])
        n = len(self._pos)
        ids, counts = np.empty(cap, dtype=np.int64), np.zeros(cap, dtype=np.float32)
        ids[:n], counts[:n] = self._ids[:n], self._counts[:n]
        self._ids, self._counts = ids, counts


@dataclass(eq=False)
class RowSamplingState:
    """Everything the sampler needs about one request, across steps.

    The sampler never mutates this; the runner calls `append(token)` after each sampled token.
    """

    params: SamplingParams
    generator: torch.Generator  # this row's own RNG: same seed -> same tokens whatever the batch
    seed: int
    prompt_ids: list[int]
    output_ids: list[int]
    eos_token_ids: frozenset[int]
    output_counts: Optional[TokenCounter]  # frequency/presence penalties: output tokens (None if unused)
    seen_tokens: Optional[TokenCounter]  # HF repetition penalty: prompt + output (None if penalty == 1)
    logit_bias_ids: Optional[torch.Tensor] = None  # [NB] long, ids >= 0
    logit_bias_values: Optional[torch.Tensor] = None  # [NB] float32
    eos_ids_tensor: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long))
    stop_ids_tensor: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long))

    @classmethod
    def create(cls, params: SamplingParams, prompt_ids: list[int],
               eos_token_ids: frozenset[int]) -> "RowSamplingState":
        """Seed the generator from `params.sampling_seed` (else a fresh nondeterministic seed)."""
        gen = torch.Generator()
        if params.sampling_seed is not None:
            seed = params.sampling_seed % _SEED_MOD
            gen.manual_seed(seed)
        else:
            seed = gen.seed()
        prompt_ids = list(prompt_ids)
        eos = frozenset(int(t) for t in eos_token_ids)
        bias_ids = bias_vals = None
        if params.logit_bias:
            items = [(int(k), float(v)) for k, v in params.logit_bias.items() if int(k) >= 0]
            if items:
                bias_ids = torch.tensor([k for k, _ in items], dtype=torch.long)
                bias_vals = torch.tensor([v for _, v in items], dtype=torch.float32)
        stop = eos | frozenset(params.stop_token_ids or ())
        return cls(
            params=params, generator=gen, seed=seed, prompt_ids=prompt_ids, output_ids=[],
            eos_token_ids=eos,
            output_counts=TokenCounter() if params.frequency_penalty or params.presence_penalty else None,
            seen_tokens=TokenCounter(prompt_ids) if params.repetition_penalty != 1.0 else None,
            logit_bias_ids=bias_ids, logit_bias_values=bias_vals,
            eos_ids_tensor=torch.tensor(sorted(eos), dtype=torch.long),
            stop_ids_tensor=torch.tensor(sorted(stop), dtype=torch.long),
        )

    def append(self, token_id: int) -> None:
        """Record a sampled (or forced, e.g. jump-forward) output token."""
        token_id = int(token_id)
        self.output_ids.append(token_id)
        if self.output_counts is not None:
            self.output_counts.add(token_id)
        if self.seen_tokens is not None:
            self.seen_tokens.add(token_id)

    def rewind(self, output_ids: list[int]) -> None:
        """The request was rolled back to `output_ids` (semantic-guard backtracking): rebuild the
        penalty counters from them. The generator keeps its position (a retry draws fresh numbers)."""
        self.output_ids = [int(t) for t in output_ids]
        if self.output_counts is not None:
            self.output_counts = TokenCounter(self.output_ids)
        if self.seen_tokens is not None:
            self.seen_tokens = TokenCounter(self.prompt_ids + self.output_ids)

    # --- what this row needs from the sampler this step ---------------------------------------
    @property
    def is_greedy(self) -> bool:
        """argmax: temperature ~ 0, or top_k == 1 (SGLang treats both as greedy)."""
        return self.params.is_greedy or self.params.top_k == 1

    @property
    def needs_repetition_penalty(self) -> bool:
        return self.seen_tokens is not None and len(self.seen_tokens) > 0

    @property
    def needs_frequency_penalty(self) -> bool:
        return self.output_counts is not None and len(self.output_counts) > 0

    def blocked_stop_ids(self) -> Optional[torch.Tensor]:
        """Token ids to mask this step: EOS + stop_token_ids until min_new_tokens outputs exist,
        and EOS always under ignore_eos. None if nothing is blocked."""
        if len(self.output_ids) < self.params.min_new_tokens:
            return self.stop_ids_tensor if self.stop_ids_tensor.numel() else None
        if self.params.ignore_eos:
            return self.eos_ids_tensor if self.eos_ids_tensor.numel() else None
        return None

    @property
    def fallback_token_id(self) -> int:
        """The token a failed row gets so shapes stay valid: the smallest EOS id (0 if none)."""
        return min(self.eos_token_ids) if self.eos_token_ids else 0

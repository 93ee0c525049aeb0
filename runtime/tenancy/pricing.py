"""Prices per 1K tokens: `--price-input` (uncached prompt), `--price-cached` (prompt tokens served from
the prefix cache; default = the input price), `--price-output` (completion).

    >>> Prices(input=0.5, output=1.5, cached=0.05).cost(prompt_tokens=1200, cached_tokens=1000, completion_tokens=100)
    0.3
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class Prices:
    input: float = 0.0
    output: float = 0.0
    cached: Optional[float] = None  # None = same as input

    @property
    def enabled(self) -> bool:
        return any(p for p in (self.input, self.output, self.cached))

    def cost(self, prompt_tokens: int, cached_tokens: int, completion_tokens: int) -> float:
        # NOTE: cached tokens are part of prompt_tokens (the engine's meta_info convention).
        cached = min(cached_tokens, prompt_tokens)
        cached_price = self.input if self.cached is None else self.cached
        total = ((prompt_tokens - cached) * self.input + cached * cached_price
                 + completion_tokens * self.output) / 1000.0
        return round(total, 10)

"""NGRAM (prompt lookup): find the request's last n tokens earlier in its own prompt + output and
propose what followed them there. No extra weights; pays when the output copies its input.

Per request, an index maps each n-gram (n in [min_n, max_n]) to the end of its latest occurrence;
it is extended incrementally as tokens arrive (O(max_n) per token). Longer matches are tried first.

    >>> from sgl.runtime.protocol import SamplingParams
    >>> req = Req(rid="r", prompt_ids=[5, 6, 7, 8, 9, 1, 5, 6], params=SamplingParams(), arrival=0)
    >>> NgramDrafter(1, 3).propose([req], 3)[0].token_ids
    [7, 8, 9]
"""

from __future__ import annotations

from typing import Sequence

from sgl.runtime.scheduler.request import Req
from sgl.runtime.speculative.drafter import Draft


class _NgramIndex:
    def __init__(self) -> None:
        self.last_end: dict[tuple[int, ...], int] = {}  # n-gram -> end (exclusive) of its latest occurrence
        self.indexed_upto = 0  # every n-gram ending at e <= indexed_upto is in last_end


class NgramDrafter:
    name = "NGRAM"

    def __init__(self, min_n: int = 1, max_n: int = 4) -> None:
        assert 1 <= min_n <= max_n
        self.min_n, self.max_n = min_n, max_n

    def propose(self, reqs: Sequence[Req], k: int) -> list[Draft]:
        return [Draft(self._propose_one(r, k)) for r in reqs]

    def _propose_one(self, req: Req, k: int) -> list[int]:
        tokens = req.fill_ids
        L = len(tokens)
        idx = req.draft_state
        if not isinstance(idx, _NgramIndex) or idx.indexed_upto > L:
            idx = req.draft_state = _NgramIndex()
        # Index n-grams ending before L (the suffix itself must not match itself).
        for e in range(max(idx.indexed_upto + 1, self.min_n), L):
            for n in range(self.min_n, min(self.max_n, e) + 1):
                idx.last_end[tuple(tokens[e - n:e])] = e
        idx.indexed_upto = max(idx.indexed_upto, L - 1)
        for n in range(min(self.max_n, L - 1), self.min_n - 1, -1):
            e = idx.last_end.get(tuple(tokens[L - n:]))
            if e is not None:
                return tokens[e:e + k]
        return []

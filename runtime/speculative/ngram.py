"""NGRAM (prompt lookup): find the request's last n tokens earlier in its own prompt + output, or in
the sequences of finished requests, and propose what followed them there. No extra weights; pays when
the output copies its input (or repeats what earlier requests wrote). A fixed corpus of text the model
typically writes is a lane of its own (runtime/speculative/ngram_corpus.py: CORPUS).

Two indexes map each n-gram (n in [min_n, max_n]) to the ends (exclusive) of its latest occurrences,
most recent first, at most `max_breadth` of them:
  - per request, over its own prompt + output, extended incrementally as tokens arrive (O(max_n) per
    token);
  - one shared index over the finished requests' prompt + output (the sequences the radix cache
    takes), oldest sequences dropped past `capacity` tokens. Own occurrences come first.
Longer matches are tried first. With max_breadth 1 the draft is the chain after the latest
occurrence; above 1 the continuations after up to max_breadth occurrences (distinct first tokens)
are merged into one token tree (a trie): the first gets k tokens, the others k // 2, and one verify
row checks them all (the sampler accepts the one the target follows).

    >>> from sgl.runtime.protocol import SamplingParams
    >>> req = Req(rid="r", prompt_ids=[5, 6, 7, 8, 9, 1, 5, 6], params=SamplingParams(), arrival=0)
    >>> NgramDrafter(1, 3).propose([req], 3)[0].token_ids
    [7, 8, 9]
    >>> req = Req(rid="t", prompt_ids=[5, 6, 7, 8, 5, 6, 3, 4, 5, 6], params=SamplingParams(), arrival=0)
    >>> d = NgramDrafter(2, 2, max_breadth=2).propose([req], 2)[0]
    >>> d.token_ids, d.parents
    ([3, 4, 7], [-1, 0, -1])
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Optional, Sequence

from sgl.runtime.scheduler.request import Req
from sgl.runtime.speculative.drafter import Draft


class _NgramIndex:
    def __init__(self) -> None:
        self.ends: dict[tuple[int, ...], list[int]] = {}  # n-gram -> ends of its latest occurrences, newest first
        self.indexed_upto = 0  # every n-gram ending at e <= indexed_upto is in `ends`


def _remember(ends: list, item: object, limit: int) -> None:
    ends.insert(0, item)
    del ends[limit:]


class _SharedIndex:
    """N-grams of finished requests' sequences: n-gram -> [(sequence id, end)], newest first."""

    def __init__(self, min_n: int, max_n: int, breadth: int, capacity: int) -> None:
        self.min_n, self.max_n, self.breadth, self.capacity = min_n, max_n, breadth, capacity
        self.seqs: "OrderedDict[int, list[int]]" = OrderedDict()
        self.ends: dict[tuple[int, ...], list[tuple[int, int]]] = {}
        self.size = 0
        self._next_id = 0

    def add(self, tokens: list[int]) -> None:
        if self.capacity <= 0 or len(tokens) < self.min_n + 1:
            return
        sid, self._next_id = self._next_id, self._next_id + 1
        self.seqs[sid] = tokens
        self.size += len(tokens)
        for e in range(self.min_n, len(tokens)):
            for n in range(self.min_n, min(self.max_n, e) + 1):
                _remember(self.ends.setdefault(tuple(tokens[e - n:e]), []), (sid, e), self.breadth)
        while self.size > self.capacity and self.seqs:
            _, old = self.seqs.popitem(last=False)  # NOTE: its entries go stale; lookups skip them
            self.size -= len(old)
        if len(self.ends) > 8 * self.capacity:  # stale entries dominate: rebuild from what is kept
            kept, self.seqs, self.ends, self.size = list(self.seqs.values()), OrderedDict(), {}, 0
            for t in kept:
                self.add(t)

    def continuations(self, gram: tuple[int, ...], k: int) -> list[list[int]]:
        out = []
        for sid, e in self.ends.get(gram, ()):
            seq = self.seqs.get(sid)
            if seq is not None and e < len(seq):
                out.append(seq[e:e + k])
        return out


class NgramDrafter:
    name = "NGRAM"
    # per-draft acceptance before a request has any (speculative_rows.py): a draft exists only after a 2-4 token
    # match, and matches mostly mean copying
    accept_prior = 0.8

    def __init__(self, min_n: int = 1, max_n: int = 4, max_breadth: int = 1, capacity: int = 0) -> None:
        assert 1 <= min_n <= max_n and max_breadth >= 1
        self.min_n, self.max_n, self.max_breadth = min_n, max_n, max_breadth
        self.shared = _SharedIndex(min_n, max_n, max_breadth, capacity) if capacity > 0 else None
        self._live: dict[Req, None] = {}  # requests seen, filed into the shared index when they finish

    def flush(self) -> None:
        """Forget the finished requests' sequences (with the radix cache: the server's /flush_cache)."""
        if self.shared is not None:
            self.shared = _SharedIndex(self.min_n, self.max_n, self.max_breadth, self.shared.capacity)
            self._live.clear()

    def propose(self, reqs: Sequence[Req], k: int) -> list[Draft]:
        if self.shared is not None:
            for r in [r for r in self._live if r.finished]:
                del self._live[r]
                self.shared.add(r.fill_ids)
            for r in reqs:
                self._live[r] = None
        return [self._propose_one(r, k) for r in reqs]

    def _propose_one(self, req: Req, k: int) -> Draft:
        tokens = req.fill_ids
        L = len(tokens)
        idx = req.draft_state.get(self.name)
        if idx is None or idx.indexed_upto > L:
            idx = req.draft_state[self.name] = _NgramIndex()
        # Index n-grams ending before L (the suffix itself must not match itself).
        for e in range(max(idx.indexed_upto + 1, self.min_n), L):
            for n in range(self.min_n, min(self.max_n, e) + 1):
                _remember(idx.ends.setdefault(tuple(tokens[e - n:e]), []), e, self.max_breadth)
        idx.indexed_upto = max(idx.indexed_upto, L - 1)
        for n in range(min(self.max_n, L - 1), self.min_n - 1, -1):
            gram = tuple(tokens[L - n:])
            conts = [tokens[e:e + k] for e in idx.ends.get(gram, ())]
            if self.shared is not None and len(conts) < self.max_breadth:
                conts += self.shared.continuations(gram, k)
            conts = [c for c in conts if c]
            if conts:
                return trie(conts[: self.max_breadth], k)
        return Draft([])


def trie(conts: list[list[int]], k: int) -> Draft:
    """One chain (a single continuation) or the trie of several: the first k tokens deep, the rest k // 2."""
    if len(conts) == 1:
        return Draft(conts[0][:k])
    tokens: list[int] = []
    parents: list[int] = []
    child: dict[tuple[int, int], int] = {}  # (parent node, token) -> node
    for i, cont in enumerate(conts):
        node = -1
        for tok in cont[: k if i == 0 else max(1, k // 2)]:
            nxt: Optional[int] = child.get((node, tok))
            if nxt is None:
                nxt = child[(node, tok)] = len(tokens)
                tokens.append(tok)
                parents.append(node)
            node = nxt
    return Draft(tokens, None if parents == list(range(-1, len(tokens) - 1)) else parents)

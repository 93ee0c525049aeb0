"""NGRAM (prompt lookup): find the request's last n tokens earlier in its own prompt + output, in
the sequences of finished requests, or in a fixed corpus, and propose what followed them there. No
extra weights; pays when the output copies its input (or repeats what earlier requests, or the corpus,
wrote).

Two indexes map each n-gram (n in [min_n, max_n]) to the ends (exclusive) of its latest occurrences,
most recent first, at most `max_breadth` of them:
  - per request, over its own prompt + output, extended incrementally as tokens arrive (O(max_n) per
    token);
  - one shared index over the finished requests' prompt + output (the sequences the radix cache
    takes), oldest sequences dropped past `capacity` tokens. Own occurrences come first;
  - optionally a corpus (CorpusIndex: text the model typically writes, `--speculative-ngram-corpus`), last.
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

import numpy as np

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


_HASH_MUL = 0x9E3779B97F4A7C15  # an odd 64-bit multiplier: the n-gram hash is sum(t_j * M^(n-1-j)) mod 2^64
_MASK64 = (1 << 64) - 1


def _gram_hash(gram: Sequence[int]) -> int:
    h = 0
    for t in gram:
        h = (h * _HASH_MUL + t) & _MASK64
    return h


class CorpusIndex:
    """N-grams of a fixed corpus (runtime/speculative/ngram_corpus.py: text the model typically writes), matched after
    the request's own sequence and the finished requests' (REST's datastore, He et al. 2023). Per n-gram it keeps
    one occurrence for each of its `breadth` most frequent next tokens, most frequent first: a corpus repeats
    its phrases many times, and the likeliest continuation is the most common one, not the latest. Never
    flushed (not the requests' text).

    Arrays, not dicts (~12 bytes per n-gram instead of ~300: the default corpus's 177k n-grams took 130 MB as
    tuples): per n, the sorted 64-bit hashes of the corpus's n-grams and their kept ends; a lookup binary-searches
    the hash and checks the tokens (a hash collision never drafts another n-gram's continuation)."""

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


class NgramDrafter:
    name = "NGRAM"
    # per-draft acceptance before a request has any (speculative_rows.py): a draft exists only after a 2-4 token
    # match, and matches mostly mean copying
    accept_prior = 0.8

    def __init__(self, min_n: int = 1, max_n: int = 4, max_breadth: int = 1, capacity: int = 0,
                 corpus: Sequence[Sequence[int]] = ()) -> None:
        """`capacity`: tokens of finished requests matched too; `corpus`: token sequences matched last (CorpusIndex)."""
        assert 1 <= min_n <= max_n and max_breadth >= 1
        self.min_n, self.max_n, self.max_breadth = min_n, max_n, max_breadth
        self.shared = _SharedIndex(min_n, max_n, max_breadth, capacity) if capacity > 0 else None
        self.corpus = CorpusIndex(corpus, min_n, max_n, max_breadth) if corpus else None
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
            if self.corpus is not None and len(conts) < self.max_breadth:
                conts += self.corpus.continuations(gram, k)
            conts = [c for c in conts if c]
            if conts:
                return _trie(conts[: self.max_breadth], k)
        return Draft([])


def _trie(conts: list[list[int]], k: int) -> Draft:
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

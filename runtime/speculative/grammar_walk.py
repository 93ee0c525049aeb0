"""Drafts under the request's grammar: a drafter that picks tokens by score (EAGLE's head, Medusa's heads)
picks, at each draft node, the best token the request's matcher allows there.

Verification cuts every draft node the mask forbids, with its subtree (runtime/executor/verify.py): a
head that does not know the grammar's state (which key comes next, that a number is closed, that an
array opened) wastes the rest of its draft there. Walking the matcher along the draft while drafting
makes every drafted token one the target could take, and turns the text the grammar forces (JSON keys,
punctuation) into draft tokens the masked target takes with probability 1.
Measured on workload (c) of benchmarks/bench_speculative.py (6-field json_schema extraction, EAGLE chain
of 4, every row drafting): benchmarks/speculative_history.md, "Drafts that follow the grammar".

The matcher is put back exactly as it was: the tokens taken are rolled back, and its error and budget
countdown restored (verify.py's fill-state snapshot), as verification's own walk does. The walk's masks skip
closing within max_new_tokens (a draft near the budget's end may then hold a node verification cuts): the
closing-path search was ~0.3 ms of every draft on workload (c). Drafts stay
deterministic (q one-hot), so the acceptance rule of drafter.py holds unchanged.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Optional, Sequence

import torch

from sgl.grammars.base import GrammarMatcher
from sgl.kernels.bitmask import allocate_token_bitmask
from sgl.runtime.executor.verify import fill_state, restore_fill_state

ENABLED = True  # False: drafters ignore the grammar (verification still cuts): the benchmark's A/B, tests


class GrammarWalk:
    """One request's matcher walked along draft paths (goto / take), then put back (close).

    The matcher only ever accepts tokens its mask allows at that point (a backend that refuses a token may
    not be usable after, as verification's walk also assumes): each path's mask is filled once and kept."""

    def __init__(self, matcher: Any) -> None:
        self.g = matcher
        self.error = matcher.error
        self.state = fill_state(matcher)
        self.path: list[int] = []  # the tokens accepted since the walk began
        self._masks: dict[tuple[int, ...], Optional[torch.Tensor]] = {}  # path -> its mask words (None: failed)

    def _words(self) -> Optional[torch.Tensor]:
        key = tuple(self.path)
        if key not in self._masks:
            g = self.g
            mask = allocate_token_bitmask(1, g.vocab.vocab_size_padded)
            g.fill_bitmask(mask, 0, within_budget=False)  # near max_new_tokens verification's masks close it
            if g.error is not self.error:  # a speculative state must not end the request
                g.error = self.error
                self._masks[key] = None
            else:
                self._masks[key] = mask[0]
        return self._masks[key]

    def allowed(self, ids: torch.Tensor) -> Optional[torch.Tensor]:
        """[len(ids)] bool: which of the target token ids `ids` the matcher allows after the path; None when
        it cannot go on from here (filling its mask failed: the draft ends here)."""
        words = self._words()
        if words is None:
            return None
        return (words.index_select(0, ids // 32) >> (ids % 32)) & 1 == 1

    def masked(self, scores: torch.Tensor, ids: torch.Tensor) -> Optional[torch.Tensor]:
        """`scores` [len(ids)] (of the target ids `ids`) with what the matcher forbids after the path at -inf;
        None when it allows none of `ids`."""
        ok = self.allowed(ids)
        if ok is None or not bool(ok.any()):
            return None
        return scores.masked_fill(~ok, float("-inf"))

    def take(self, token_id: int) -> bool:
        """Accept `token_id` as the path's next token; False (the matcher unchanged) if its mask forbids it, or
        the path already ends in EOS (a draft ends there: verification samples nothing after it)."""
        if self.path and self.path[-1] in self.g.vocab.eos_token_ids:
            return False
        words = self._words()
        if words is None or not int(words[token_id // 32]) >> (token_id % 32) & 1:
            return False
        if not self.g.accept(token_id):
            self.g.error = self.error
            return False
        self.path.append(token_id)
        return True

    def goto(self, path: list[int]) -> bool:
        """Walk to `path` (from the walk's start): back to the common prefix, then take the rest; False if the
        mask forbids a token of it (the walk then stands on the part taken)."""
        common = 0
        while common < min(len(path), len(self.path)) and path[common] == self.path[common]:
            common += 1
        self.back(len(self.path) - common)
        return all(self.take(t) for t in path[common:])

    def back(self, n: int) -> None:
        """Undo the path's last `n` tokens."""
        n = min(n, len(self.path))
        if n > 0:
            self.g.rollback(n)
            del self.path[len(self.path) - n:]

    def close(self) -> None:
        """Put the matcher back as it was before the walk."""
        self.back(len(self.path))
        self.g.error = self.error
        restore_fill_state(self.g, self.state)


def _live(matcher: Any) -> bool:
    """A sgl.grammars matcher a draft may walk: no error and no pending guard rollback."""
    return ENABLED and isinstance(matcher, GrammarMatcher) and matcher.error is None \
        and getattr(matcher, "pending", None) is None


@contextmanager
def grammar_walks(reqs: Sequence[Any]) -> Iterator[list[Optional[GrammarWalk]]]:
    """A walk per request with a live matcher (_live), else None; every walk is closed (its matcher put back) when the block ends, however it ends."""
    walks = [GrammarWalk(r.grammar) if _live(r.grammar) else None for r in reqs]
    try:
        yield walks
    finally:
        for w in walks:
            if w is not None:
                w.close()


def with_forced_text(matcher: Any, tokens: list[int], limit: int) -> list[int]:
    """A chain draft of a constrained request made to hold the text the grammar forces wherever its tokens lead
    into some, as verification takes it (runtime/executor/verify.py: after an accepted token with forced tokens
    F, the draft must hold all of F, canonically tokenized, else the row stops there): where the draft holds F
    it is kept; where it does not (it ends inside F, or tokenizes the forced text another way), its rest is
    replaced by F, so the row takes F and samples once after it; where F does not fit in `limit` tokens (the
    request's room), the draft ends before F. A token the mask forbids ends the draft (verification would cut
    it). The matcher is put back."""
    if not _live(matcher):
        return tokens
    walk = GrammarWalk(matcher)
    try:
        out: list[int] = []
        i = 0
        while i < len(tokens) and len(out) < limit and walk.take(tokens[i]):
            out.append(tokens[i])
            i += 1
            forced = matcher.jump_forward_tokens()
            if not forced:
                continue
            if tokens[i:i + len(forced)] != forced:
                return out + forced if len(out) + len(forced) <= limit else out
            if len(out) + len(forced) > limit or not all(walk.take(t) for t in forced):
                return out
            out += forced
            i += len(forced)
        return out
    finally:
        walk.close()

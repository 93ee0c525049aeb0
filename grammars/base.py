"""The backend interface: a `GrammarBackend` compiles a `GrammarSpec` into a `CompiledGrammar`, whose
`matcher()` is a per-request `GrammarMatcher`. A registry maps `--grammar-backend` names to lazily
imported implementations, so a missing optional package only matters when it is selected.

The matcher never raises inside the serving loop: any backend exception, a rejected token or an empty
mask moves it into an error state (`matcher.error` is the message) from which it only allows EOS.
"""
from __future__ import annotations

import importlib
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import torch

from sgl.grammars.budget import MARGIN, closing_path, greedy_path_length
from sgl.grammars.errors import GrammarError
from sgl.grammars.vocabulary import Vocabulary
from sgl.grammars.witness import witnesses

KINDS = ("regex", "json_schema", "ebnf", "choices")


@dataclass(frozen=True)
class GrammarSpec:
    """A validated constraint ready for a backend.

    kind: one of KINDS. For json_schema, `value` is the NORMALIZED schema as a JSON string (see
    sgl.grammars.json_schema); for choices, the choices as a tuple; otherwise the user's text.
    """

    kind: str
    value: Union[str, tuple[str, ...]]
    json_whitespace: str = "compact"  # "compact" | "flexible"
    max_whitespace: int = 4  # flexible whitespace: at most this many blanks in a row (so loops end)
    # json_schema with semantic guards (grammars/guards.py): (schema pointer, keyword) pairs the grammar
    # relaxes, and the user's original schema (JSON) they are checked against. Backends ignore both.
    guards: tuple[tuple[str, str], ...] = ()
    source: Optional[str] = None
    # the normalized schema with the long string bounds the guards defer kept (None: none deferred)
    exact_value: Optional[str] = None


@dataclass(frozen=True)
class BackendOptions:
    json_whitespace: str = "compact"
    max_whitespace: int = 4


class GrammarMatcher(ABC):
    """Per-request matching state. Subclasses implement the `_`-prefixed methods; may raise freely."""

    def __init__(self, vocab: Vocabulary):
        self.vocab = vocab
        self.error: Optional[str] = None
        self._eos_accepted = False
        # EOS taken again after EOS (only EOS is allowed then; a draft's or verification's walk may hold several):
        # no-ops that `rollback` undoes first, so rolling back over them never undoes a real token
        self._eos_repeats = 0
        self._words = (vocab.vocab_size_padded + 31) // 32  # bitmask words this vocabulary needs
        self._num_accepted = 0  # tokens accepted and not rolled back
        self._head: list[int] = []  # the first min(_num_accepted, HEAD_TOKENS) of them (the mask cache's key)
        # The compiled grammar's slot for its first mask (the same for every fresh matcher), set by
        # `CompiledGrammar.matcher`. NOTE: the first masks of a grammar are its slowest (~150 us with
        # llguidance vs ~6 us later); a job of many requests with one schema computes it once.
        self._initial_mask: Optional["InitialMask"] = None
        self._budget: Optional[int] = None  # max_new_tokens, once `set_token_budget` was called
        self._budget_check_at = 0  # recompute the closing path once the remaining budget is <= this
        self.budget_closed = False  # the mask was narrowed to close the output within the budget
        # The committed closing path once narrowing started: (accepted-token count it applies at, its
        # rest). Followed token by token: a recomputed path need not be the rest of the last one (the
        # fallback walks are not greedy), and switching paths near the end can run out of budget.
        # NOTE: `accept` advances it too: jump-forward accepts forced tokens without a mask, and a
        # path dropped there (Github_trivial o9816 on the model) left no room for a new one.
        self._closing: Optional[tuple[int, list[int]]] = None
        # Strings that match the grammar's patterns/formats (sgl.grammars.witness), set by
        # `CompiledGrammar.matcher`: the closing walks try them where one-token choices never end.
        self.witnesses: tuple[bytes, ...] = ()
        # (accepted-token count, length) of the closing paths computed over the last RECENT_TOKENS
        # accepted tokens. NOTE: replaced, never
        # mutated in place (runtime/executor/verify.py snapshots it by reference).
        self._recent_paths: list[tuple[int, int]] = []
        self._far_walk_failed = False  # `_budget_backoff`'s greedy walk found no end once: it is not tried again

    def set_token_budget(self, max_new_tokens: int) -> None:
        """Close the output within `max_new_tokens` accepted tokens (see sgl.grammars.budget)."""
        self._budget = int(max_new_tokens)
        self._budget_check_at = self._budget

    # --- public, never raises -------------------------------------------------------------------
    def fill_bitmask(self, bitmask: torch.Tensor, row: int, within_budget: bool = True) -> None:
        """Write the allowed-next-token bits of this request into ``bitmask[row]`` ([B, W] int32).

        Bit j of word w set = token 32*w+j allowed. Words past this vocabulary are zeroed. In the error
        state, or once finished, only EOS is allowed. `within_budget=False` skips closing within
        max_new_tokens (a speculative draft's walk: only verification's masks must close it).
        """
        out = bitmask[row]  # [W]
        if out.shape[0] < self._words:
            raise ValueError(f"bitmask has {out.shape[0]} words per row, need {self._words}")
        if self.error is None and not self._eos_accepted:
            cache = self._initial_mask if self._num_accepted <= HEAD_TOKENS else None
            try:
                words = None if cache is None else cache.words if self._num_accepted == 0 else \
                    cache.heads.get(tuple(self._head))
                if words is not None:
                    out[: self._words].copy_(words)
                else:
                    self._fill(out[: self._words])
                    if cache is not None and self._num_accepted == 0:
                        cache.words = out[: self._words].clone()
                    elif cache is not None and len(cache.heads) < MAX_HEADS and self.error is None:
                        cache.heads[tuple(self._head)] = out[: self._words].clone()
            except Exception as e:  # noqa: BLE001 - any backend failure ends this request only
                self._fail(f"grammar backend failed to compute the mask: {e}")
            else:
                if out.shape[0] > self._words:
                    out[self._words:] = 0
                if self.error is None and not out.numpy().any():
                    self._fail("the grammar allows no next token (unsatisfiable constraint)")
                if within_budget and self._budget is not None and self.error is None:
                    try:
                        self._close_within_budget(out)
                    except Exception as e:  # noqa: BLE001 - a probe that broke the matcher ends this request only
                        self._fail(f"grammar backend failed while closing within max_new_tokens: {e}")
        if self.error is not None or self._eos_accepted:
            out.zero_()
            for e in self.vocab.eos_token_ids:
                out[e // 32] |= _bit(e % 32)

    def accept(self, token_id: int) -> bool:
        """Advance by one sampled token. False (and the error state) if the token is not allowed."""
        if self.error is not None:
            return False
        if self._eos_accepted:
            if token_id not in self.vocab.eos_token_ids:
                return False
            self._eos_repeats += 1
            return True
        try:
            ok = self._accept(int(token_id))
        except Exception as e:  # noqa: BLE001
            self._fail(f"grammar backend failed to accept token {token_id}: {e}")
            return False
        if not ok:
            self._fail(f"token {token_id} ({self.vocab.decode([token_id])!r}) is not allowed by the grammar")
            return False
        if self._closing is not None:  # a token taken without a mask (jump-forward) may be the path's next
            at, rest = self._closing
            if at == self._num_accepted and rest and rest[0] == token_id:
                self._closing = (at + 1, rest[1:])
        if self._num_accepted < HEAD_TOKENS:
            self._head.append(int(token_id))
        self._num_accepted += 1
        if token_id in self.vocab.eos_token_ids:
            self._eos_accepted = True
        return True

    def rollback(self, n: int) -> None:
        """Undo the last `n` accepted tokens (speculative decoding, jump-forward retokenization)."""
        if n <= 0 or self.error is not None:
            return
        try:
            repeats = min(n, self._eos_repeats)  # EOS after EOS: nothing to undo in the backend
            self._eos_repeats -= repeats
            rest = real = n - repeats
            if rest > 0 and self._eos_accepted:  # the last accepted token: the backend undoes it its own way
                self._eos_accepted = False
                self._rollback_eos()
                rest -= 1
            if rest > 0:
                self._rollback(rest)
            self._num_accepted = max(0, self._num_accepted - real)
            del self._head[self._num_accepted:]
        except Exception as e:  # noqa: BLE001
            self._fail(f"grammar backend failed to roll back {n} tokens: {e}")

    def is_finished(self) -> bool:
        """True once EOS was accepted, or the grammar is complete and only EOS may follow."""
        if self._eos_accepted:
            return True
        if self.error is not None:
            return False
        try:
            return self._is_terminated()
        except Exception as e:  # noqa: BLE001
            self._fail(f"grammar backend failed: {e}")
            return False

    def jump_forward(self) -> Optional[str]:
        """The text the grammar forces next (a UTF-8-complete prefix of the forced bytes), or None."""
        toks = self.jump_forward_tokens()
        if not toks:
            return None
        text = self.vocab.decode(toks).decode("utf-8", errors="ignore")
        return text or None

    def jump_forward_tokens(self) -> list[int]:
        """Tokens the grammar forces next, tokenized canonically and safely at the boundary (the last
        forced bytes that could merge with what follows are left out). The matcher is NOT advanced:
        call `accept` on each to commit them. Empty when nothing is forced or in the error state."""
        if self.error is not None or self._eos_accepted:
            return []
        try:
            return [t for t in self._forced_tokens()]
        except Exception as e:  # noqa: BLE001
            self._fail(f"grammar backend failed to compute the forced continuation: {e}")
            return []

    def _fail(self, message: str) -> None:
        if self.error is None:
            self.error = message

    def _close_within_budget(self, out: torch.Tensor) -> None:
        """Narrow `out` to the closing path's next token once the remaining budget is within MARGIN of
        the path's length. The path is recomputed at most every 8 tokens, every token near the end."""
        remaining = self._budget - self._num_accepted  # type: ignore[operator]
        if remaining <= 0:
            return
        if self._closing is not None:
            at, rest = self._closing
            if at == self._num_accepted and (not rest or self._allows(rest[0])):
                self._closing = (at + 1, rest[1:])
                self._narrow(out, rest[:1])
                return
            self._closing = None  # rolled back or left the path: recompute
        if remaining > self._budget_check_at:
            return
        path = closing_path(self, min(remaining + 16, 512), fallback_limit=remaining)
        if path is None:  # no completion within the budget left: try again a few tokens later
            self._budget_check_at = remaining - self._budget_backoff(remaining)
            return
        if len(path) > remaining:  # NOTE: never commit to a path longer than the budget left
            self._budget_check_at = remaining - 1
            return
        # NOTE: commit by the longest of the recent paths, not only this one: one token can lengthen the
        # path a lot (`},` then a forced `{"price` opens an item whose required keys must all be written:
        # 5 -> 15 tokens in Glaiveai2K generate_invoice on the model); closing early is still valid.
        # NOTE: a window of tokens, not of paths: near the end a path is computed every token, and 8 paths
        # back no longer reached the last item's opening (Github_easy o45164: 6 required keys per item,
        # `},{"` lengthens the path 2 -> 37 once per ~80 tokens; it never committed and ended unparsed)
        self._recent_paths = [(a, n) for a, n in self._recent_paths if a > self._num_accepted - RECENT_TOKENS] \
            + [(self._num_accepted, len(path))]
        longest = max(n for _, n in self._recent_paths)
        # NOTE: and ahead of the path's growth: a path that grows with the output (nesting deeper one level
        # per few tokens, Github_medium o69631) narrows the gap by 1 + rate per token, so it could pass
        # MARGIN between two checks.
        lead = math.ceil(GROWTH_LOOKAHEAD * _growth_rate(self._recent_paths))
        if remaining > longest + MARGIN + lead:
            window = longest + MARGIN + lead + 16
            self._budget_check_at = remaining - 1 if remaining <= window else max(window, remaining - 8)
            return
        self._budget_check_at = remaining - 1
        self._closing = (self._num_accepted + 1, path[1:])
        self._narrow(out, path[:1])

    def _budget_backoff(self, remaining: int) -> int:
        """Tokens to wait before the next closing walk when none fit in `remaining`: 4, or a quarter of
        the gap when one greedy walk (up to FAR_WALK x remaining) ends that far past the budget.
        NOTE: the walks that found nothing cost ~0.1 s per call; every 4 tokens that was ~12 s of the
        scheduler thread over a 512-token request whose shortest completion is ~2900 tokens
        (Github_medium o83287: 67 required keys whose values have 6 required keys each), which no
        model output can close. The path shortens by at most a few tokens per accepted token (each
        writes what the path would), so a quarter of the gap is passed before the path can fit."""
        if self._far_walk_failed:  # NOTE: a walk that loops costs its whole limit: probe once, not per check
            return 4
        far = greedy_path_length(self, min(FAR_WALK * remaining, FAR_WALK_CAP))
        if far is None:
            self._far_walk_failed = True
            return 4
        return max(4, (far - remaining) // 4)

    def _narrow(self, out: torch.Tensor, tokens: list[int]) -> None:
        """Allow only `tokens` (none: only EOS) in `out`."""
        before = out.clone()
        out.zero_()
        for t in (tokens or sorted(self.vocab.eos_token_ids)):
            out[t // 32] |= _bit(t % 32)
        if not torch.equal(before, out):  # closed early only if the narrowing removed a choice
            self.budget_closed = True

    # --- backend hooks ---------------------------------------------------------------------------
    @abstractmethod
    def _fill(self, row: torch.Tensor) -> None:
        """Write this vocabulary's ``row`` ([self._words] int32, contiguous view)."""

    @abstractmethod
    def _accept(self, token_id: int) -> bool: ...

    @abstractmethod
    def _rollback(self, n: int) -> None: ...

    def _rollback_eos(self) -> None:
        """Undo the EOS that `_accept` took last (backends that do not record EOS override this: a speculative
        draft walks through EOS and back, and one token too many rolled back corrupts the matcher)."""
        self._rollback(1)

    @abstractmethod
    def _is_terminated(self) -> bool: ...

    def _forced_tokens(self) -> list[int]:
        return []

    # Budget closing probes (sgl.grammars.budget); backends override these with cheap native calls.
    def _fork(self) -> Optional["GrammarMatcher"]:
        """An independent copy to probe ahead on (None: probe on self and roll back). A backend whose
        matcher cannot roll back out of an error state (llguidance after a dead end) must fork."""
        return None

    def _probe_row(self) -> torch.Tensor:
        row = torch.zeros(self._words, dtype=torch.int32)
        self._fill(row)
        return row

    def _allows(self, token_id: int) -> bool:
        return bool(int(self._probe_row()[token_id // 32]) & _bit(token_id % 32))

    def _can_end(self) -> bool:
        row = self._probe_row()
        return any(int(row[e // 32]) & _bit(e % 32) for e in self.vocab.eos_token_ids)

    def _any_allowed(self) -> Optional[int]:
        """The lowest allowed non-EOS token id, or None."""
        row = self._probe_row().numpy().view("uint32")
        for w in row.nonzero()[0]:
            for j in range(32):
                t = int(w) * 32 + j
                if row[w] >> j & 1 and t not in self.vocab.eos_token_ids:
                    return t
        return None


# tokens: commit this many tokens of path growth early, and by the longest closing path computed over
# this many accepted tokens (see `_close_within_budget`)
GROWTH_LOOKAHEAD = 8
RECENT_TOKENS = 128
# budget closing's probe of how far the end is (`_budget_backoff`): a walk of up to FAR_WALK x the budget left
FAR_WALK = 8
FAR_WALK_CAP = 8192


def _growth_rate(recent: list[tuple[int, int]]) -> float:
    """Closing-path tokens gained per accepted token over the recent paths (0 if shrinking or one path)."""
    (a0, n0), (a1, n1) = recent[0], recent[-1]
    return max(0.0, (n1 - n0) / (a1 - a0)) if a1 > a0 else 0.0


def _bit(j: int) -> int:
    """int32 value with bit j set (bit 31 is the sign bit)."""
    return -(1 << 31) if j == 31 else (1 << j)


# The first masks after the same few tokens are the same for every request of a grammar and among its
# slowest (llguidance builds its lexer states lazily: 0.3-0.9 ms right after `{"` of a pattern-keyed
# object): masks after up to HEAD_TOKENS tokens are kept per grammar, at most MAX_HEADS (6 KiB each).
HEAD_TOKENS = 3
MAX_HEADS = 16


class InitialMask:
    """A compiled grammar's first bitmask rows: the first (`words`, computed by the compile thread) and
    those after each of up to MAX_HEADS token prefixes of at most HEAD_TOKENS tokens (`heads`),
    computed by the first matcher that gets there and copied by the rest."""

    __slots__ = ("words", "heads")

    def __init__(self) -> None:
        self.words: Optional[torch.Tensor] = None  # [W] int32
        self.heads: dict[tuple[int, ...], torch.Tensor] = {}  # token prefix -> [W] int32


class CompiledGrammar(ABC):
    """One compiled constraint, shared by every request that uses it."""

    spec: GrammarSpec

    def matcher(self) -> GrammarMatcher:
        """A fresh per-request matcher."""
        m = self._new_matcher()
        if "_initial" not in self.__dict__:
            self._initial = InitialMask()
            spec = getattr(self, "spec", None)
            self._witnesses = witnesses(spec.kind, spec.value) if spec is not None else ()
        m._initial_mask = self._initial
        m.witnesses = self._witnesses
        return m

    def warm(self) -> None:
        """Compute the first mask now (the compile thread calls this), so that no request's first step
        pays it: it is a grammar's slowest mask (llguidance: 0.4-1 ms on JSONSchemaBench schemas, the
        p99 of all masks), and every matcher then copies it."""
        m = self.matcher()
        m.fill_bitmask(torch.zeros(1, m._words, dtype=torch.int32), 0)

    @abstractmethod
    def _new_matcher(self) -> GrammarMatcher: ...


class GrammarBackend(ABC):
    """Compiles specs for one vocabulary. Instances are made by `get_backend(name, vocab, options)`."""

    name: str = "?"

    def __init__(self, vocab: Vocabulary, options: BackendOptions):
        self.vocab = vocab
        self.options = options

    @abstractmethod
    def compile(self, spec: GrammarSpec) -> CompiledGrammar:
        """Compile; raise GrammarError for a constraint this backend cannot handle. May be slow."""

    def check(self, spec: GrammarSpec) -> None:
        """Fast syntax check without the vocabulary (called at request submission). Default: nothing."""


# name -> "module:Class", imported on first use so optional packages stay optional.
_REGISTRY: dict[str, str] = {
    "llguidance": "sgl.grammars.backends.llguidance_backend:LLGuidanceBackend",
    "xgrammar": "sgl.grammars.backends.xgrammar_backend:XGrammarBackend",
    "outlines": "sgl.grammars.backends.outlines_backend:OutlinesBackend",
}


def register_backend(name: str, target: Union[str, Callable[..., GrammarBackend]]) -> None:
    """Register a backend class (or "module:Class" path) under `name`."""
    _REGISTRY[name] = target  # type: ignore[assignment]


def available_backends() -> list[str]:
    return sorted(_REGISTRY)


def get_backend(name: str, vocab: Vocabulary, options: BackendOptions) -> GrammarBackend:
    target: Any = _REGISTRY.get(name)
    if target is None:
        raise ValueError(f"unknown grammar backend {name!r}; choose one of {available_backends()}")
    if isinstance(target, str):
        mod, _, cls = target.partition(":")
        try:
            target = getattr(importlib.import_module(mod), cls)
        except ImportError as e:
            raise ValueError(f"grammar backend {name!r} needs a package that is not installed: {e}") from e
    return target(vocab, options)


__all__ = ["KINDS", "GrammarSpec", "BackendOptions", "GrammarMatcher", "CompiledGrammar", "GrammarBackend",
           "GrammarError", "register_backend", "available_backends", "get_backend"]

"""Semantic guards: the JSON Schema keywords no grammar enforces exactly (uniqueItems over infinite
domains, overlapping oneOf = exactly one, `not` of a general schema, an `if` with no complement,
`format` values), checked per value with jsonschema as soon as the value closes, with bounded
backtracking on a violation.

The normalizer (json_schema.py, guard mode) relaxes such a keyword in the grammar and records
(schema pointer, keyword). `SchemaGuard` (grammars/guard_schema.py) checks each closed value against
the schema nodes that surely apply at its path and hold a guarded keyword of their own. The relaxed
grammar + these checks == the schema; a last check of
the whole document at the end is the safety net (on a miss the request aborts, never returns invalid).

`GuardedMatcher` wraps a backend matcher. On a violation it records a pending rollback: back to the
start of the failing value's last child (first two failures of that value), else of the value itself;
the token that opened the abandoned part becomes forbidden at that position (masked from then on).
The scheduler performs the rollback (runtime/scheduler/rollback.py: output, KV, matcher). The tokens
thrown away are counted against the backtrack budget; past it the matcher fails with a message naming
the keyword (the request ends with finish_reason abort).
"""
from __future__ import annotations

import json
import threading
import time
from collections import defaultdict
from typing import Any, Callable, Optional

import torch

from sgl.grammars.base import CompiledGrammar, GrammarMatcher, _bit
from sgl.grammars.guard_schema import GuardViolation, SchemaGuard, json_equal, json_path
from sgl.grammars.json_tracker import Closed, JsonTracker

_SWITCH_SLACK = 64  # bytes beyond one token's: room for the pattern's end after the switch
_FAILURES_BEFORE_WHOLE_VALUE = 2  # rollbacks to a value's last child before rolling back the whole value
# Violations a longer container fixes: the first rollback only reopens it (its closing token masked).
_NEEDS_MORE = frozenset({"minProperties", "minItems", "required", "contains", "minContains", "dependentRequired"})


class GuardedGrammar(CompiledGrammar):
    """A compiled grammar whose matchers carry the schema's guard. `exact`: compiles the same schema with
    the long string bounds the guard defers kept (json_schema.normalize(exact_bounds=True)), or None."""

    def __init__(self, inner: CompiledGrammar, guard: SchemaGuard,
                 exact: Optional[Callable[[], CompiledGrammar]] = None):
        self.inner = inner
        self.spec = inner.spec
        self.guard = guard
        self.compile_time_s = getattr(inner, "compile_time_s", 0.0)
        self._exact_compile = exact
        self._exact: Optional[CompiledGrammar] = None
        self._exact_lock = threading.Lock()

    def exact_matcher(self) -> Optional[GrammarMatcher]:
        """A fresh matcher of the exact grammar (compiled once, on first use), or None."""
        if self._exact_compile is None:
            return None
        with self._exact_lock:
            if self._exact is None:
                self._exact = self._exact_compile()
        return self._exact.matcher()

    def _new_matcher(self) -> GrammarMatcher:
        return GuardedMatcher(self.inner.matcher(), self.guard, grammar=self)


class GuardedMatcher(GrammarMatcher):
    """A backend matcher + a guard + forbidden (position, token) pairs. See the module docstring."""

    def __init__(self, inner: GrammarMatcher, guard: SchemaGuard, backtrack_budget: int = 256,
                 grammar: Optional[GuardedGrammar] = None):
        super().__init__(inner.vocab)
        self.inner = inner
        self.guard = guard
        self.grammar = grammar if grammar is not None and grammar._exact_compile is not None else None
        self.switch_margin = inner.vocab.token_bytes.max_len + _SWITCH_SLACK  # one token can add at most max_len
        self.backtrack_budget = backtrack_budget
        self.tracker = JsonTracker()
        self.tokens: list[int] = []  # accepted tokens (== the request's output ids)
        self.ends: list[int] = []  # byte offset after each accepted token
        self.forbidden: dict[int, set[int]] = defaultdict(set)  # position -> token ids masked there
        self.failures: dict[int, int] = defaultdict(int)  # value start byte -> violations so far
        self.pending: Optional[int] = None  # roll back to this many tokens (the scheduler does it)
        self.violation: Optional[GuardViolation] = None
        self.backtracked_tokens = 0
        self.num_backtracks = 0
        self.num_switches = 0  # to the exact grammar near a deferred bound
        self.guard_time_s = 0.0

    def set_backtrack_budget(self, tokens: int) -> None:
        self.backtrack_budget = int(tokens)

    # --- the mask -------------------------------------------------------------------------------
    def fill_bitmask(self, bitmask: torch.Tensor, row: int, within_budget: bool = True) -> None:
        super().fill_bitmask(bitmask, row, within_budget)
        banned = self.forbidden.get(self._num_accepted) if self.error is None else None
        if banned:
            out = bitmask[row]
            before = out.clone()
            for t in banned:
                out[t // 32] &= ~_bit(t % 32)
            if not out.numpy().any():  # nothing else left here: allow them again (the budget bounds retries)
                out.copy_(before)

    def _switch_near_bound(self) -> None:
        """Inside a string whose guarded `maxLength` was deferred (schema_relax.guard_long_format_bound), once
        its bytes come within the switch margin of the bound: continue on the exact grammar (the bound kept),
        the tokens so far replayed into it (checked after each accepted token: every later mask and probe,
        budget closing's included, is the exact grammar's). From there its masks keep the string within the
        bound and leave room to complete its pattern, as if the bound had been in the grammar from the start
        (one token adds less than the margin). If the replay fails (the pattern cannot end in the room
        left), the guard still checks the string when it closes."""
        s = self.tracker.scalar
        if s is None or s[0] != '"' or s[2]:
            return
        bound = self.guard.max_length(s[3])
        if bound is None or len(self.tracker.data) - s[1] - 1 + self.switch_margin < bound:
            return
        grammar, self.grammar = self.grammar, None  # one switch per matcher (the exact grammar has every bound)
        exact = grammar.exact_matcher()
        if exact is None or not all(exact.accept(t) for t in self.tokens) or exact.error is not None:
            return
        self.inner = exact
        self.num_switches += 1

    # --- backend hooks ----------------------------------------------------------------------------
    def _fill(self, row: torch.Tensor) -> None:
        self.inner._fill(row)
        if self.inner.error is not None:  # the backend records its own failures on the inner matcher
            self._fail(self.inner.error)

    def _accept(self, token_id: int) -> bool:
        if not self.inner._accept(token_id):
            if self.inner.error is not None:
                self._fail(self.inner.error)
            return False
        self.tokens.append(token_id)
        data = b"" if token_id in self.vocab.eos_token_ids else (self.vocab.decode([token_id]) or b"")
        t0 = time.perf_counter()
        closed = self.tracker.feed(data)
        if token_id in self.vocab.eos_token_ids or self.inner._is_terminated():
            closed += self.tracker.finish()
        self.ends.append(len(self.tracker.data))
        for c in closed:
            if self._check(c):
                break
        else:
            if self.tracker.done and self.tracker.scalar is None and not self.tracker.stack and closed:
                self._check_document()
        if self.grammar is not None and self.pending is None:
            self._switch_near_bound()
        self.guard_time_s += time.perf_counter() - t0
        return True

    def _rollback(self, n: int) -> None:
        self.inner._rollback(n)
        self._forget(n)

    def _rollback_eos(self) -> None:
        self.inner._rollback_eos()
        self._forget(1)

    def _forget(self, n: int) -> None:
        """The guard's side of rolling back the last `n` tokens."""
        keep = len(self.tokens) - n
        del self.tokens[keep:]
        del self.ends[keep:]
        self.tracker = JsonTracker()
        self.tracker.feed(b"".join(b"" if t in self.vocab.eos_token_ids else (self.vocab.decode([t]) or b"")
                                   for t in self.tokens))
        self.pending = None
        self.violation = None
        for pos in [p for p in self.forbidden if p > keep]:  # pairs past the new end belonged to abandoned text
            del self.forbidden[pos]

    def _is_terminated(self) -> bool:
        return self.inner._is_terminated()

    def _forced_tokens(self) -> list[int]:
        if self.pending is not None:
            return []
        forced = self.inner._forced_tokens()
        for j, t in enumerate(forced):  # never force a token masked at its position
            if t in self.forbidden.get(self._num_accepted + j, ()):
                return forced[:j]
        return forced

    def _fork(self) -> Optional[GrammarMatcher]:
        return self.inner._fork()

    def _probe_row(self) -> torch.Tensor:
        return self.inner._probe_row()

    def _allows(self, token_id: int) -> bool:
        return self.inner._allows(token_id)

    def _can_end(self) -> bool:
        return self.inner._can_end()

    def _any_allowed(self) -> Optional[int]:
        return self.inner._any_allowed()

    # --- guard ------------------------------------------------------------------------------------
    def stable_tokens(self) -> int:
        """Output tokens that no rollback can take back: those before the outermost open guarded value."""
        for path, start in self.tracker.open_starts():
            if self.guard.guarded(path):
                return self._token_at(start)
        return len(self.tokens)

    def _token_at(self, byte: int) -> int:
        """Index of the token holding output byte `byte`."""
        lo, hi = 0, len(self.ends)
        while lo < hi:  # first k with ends[k] > byte
            mid = (lo + hi) // 2
            if self.ends[mid] > byte:
                hi = mid
            else:
                lo = mid + 1
        return lo

    def _value(self, start: int, end: int) -> Any:
        return json.loads(bytes(self.tracker.data[start:end]).decode("utf-8"))

    def _content_start(self, byte: int) -> int:
        """Where a value's content starts: after a string's opening quote (the quote is not the choice
        that failed; masking it would push the model into odd tokenizations)."""
        return byte + 1 if self.tracker.data[byte:byte + 1] == b'"' else byte

    def _check(self, c: Closed) -> bool:
        try:
            if c.siblings and isinstance(c.path[-1], int) and self.guard.unique_items(c.path[:-1]):
                # uniqueItems holds for every prefix of a valid array: check each element as it closes
                value = self._value(c.start, c.end)
                if any(json_equal(value, self._value(a, b)) for a, b in c.siblings):
                    v = GuardViolation("uniqueItems", json_path(c.path[:-1]), f"item {c.path[-1]} repeats an earlier item")
                    self._violate(v, self._token_at(self._content_start(c.start)))
                    return True
            if c.path and isinstance(c.path[-1], int) and self._too_many_contained(c):
                return True
            if not self.guard.guarded(c.path):
                return False
            value = self._value(c.start, c.end)
        except ValueError:
            return False  # the grammar guarantees JSON; a partial atom is checked when complete
        v = self.guard.check(c.path, value)
        if v is None:
            return False
        self.failures[c.start] += 1
        tries = self.failures[c.start]
        if v.keyword in _NEEDS_MORE and tries == 1 and c.end - c.start > 1:
            # the container closed too early: take back (and mask) its closing bracket only
            self._violate(v, self._token_at(c.end - 1))
            return True
        target = c.start
        if c.last_child is not None and tries <= _FAILURES_BEFORE_WHOLE_VALUE + (v.keyword in _NEEDS_MORE):
            target = c.last_child
        self._violate(v, self._token_at(self._content_start(target)))
        return True

    def _too_many_contained(self, c: Closed) -> bool:
        """maxContains counted item by item (more matches than allowed in a prefix stays a violation):
        a violation takes back the item that closed."""
        for contains, hi in self.guard.max_contains(c.path[:-1]):
            items = [self._value(a, b) for a, b in c.siblings] + [self._value(c.start, c.end)]
            if sum(contains.is_valid(x) for x in items) > hi:
                v = GuardViolation("maxContains", json_path(c.path[:-1]), f"more than {hi} items match 'contains'")
                self._violate(v, self._token_at(self._content_start(c.start)))
                return True
        return False

    def _check_document(self) -> None:
        try:
            value = json.loads(bytes(self.tracker.data).decode("utf-8"))
        except ValueError:
            return
        v = self.guard.check_document(value)
        if v is not None:  # NOTE: the per-value checks should have caught it; never return it
            self._fail(f"the output violates JSON Schema keyword {v.keyword!r} at {v.path}: {v.message}")

    def _violate(self, v: GuardViolation, keep: int) -> None:
        cost = len(self.tokens) - keep
        if self.backtracked_tokens + cost > self.backtrack_budget:
            self._fail(f"semantic guard for JSON Schema keyword {v.keyword!r} failed at {v.path} ({v.message}) "
                       f"and the backtrack budget of {self.backtrack_budget} tokens is spent "
                       "(--grammar-backtrack-budget)")
            return
        self.backtracked_tokens += cost
        self.num_backtracks += 1
        self.forbidden[keep].add(self.tokens[keep])
        self.pending = keep
        self.violation = v

    def take_rollback(self) -> Optional[int]:
        """The number of output tokens to keep after a guard violation (then call the scheduler's
        rollback, which calls `rollback`), or None."""
        return self.pending

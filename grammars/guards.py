"""Semantic guards: the JSON Schema keywords no grammar enforces exactly (uniqueItems over infinite
domains, overlapping oneOf = exactly one, `not` of a general schema, an `if` with no complement,
`format` values), checked per value with jsonschema as soon as the value closes, with bounded
backtracking on a violation.

The normalizer (json_schema.py, guard mode) relaxes such a keyword in the grammar and records
(schema pointer, keyword). `SchemaGuard` maps a closed value's JSON path to the schema nodes that
apply to it for sure (through properties / patternProperties / additionalProperties / items /
prefixItems / additionalItems / allOf / $ref) and validates the value against every such node that
holds a guarded keyword "of its own" (at the node or inside its anyOf/oneOf/not/if/... branches,
which no deeper path can check). The relaxed grammar + these checks == the schema; a last check of
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
import re
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Optional

import jsonschema
import torch

from sgl.grammars.base import CompiledGrammar, GrammarMatcher, _bit
from sgl.grammars.json_tracker import Closed, JsonTracker, PathElem

# Edges to subschemas that apply to a value's children (or the value itself: allOf, $ref) for sure.
_DEFINITE = frozenset({"properties", "patternProperties", "additionalProperties", "items", "prefixItems",
                       "additionalItems", "allOf", "$ref"})
_NOT_SCHEMAS = frozenset({"enum", "const", "$defs", "definitions", "examples", "default", "required"})
_FAILURES_BEFORE_WHOLE_VALUE = 2  # rollbacks to a value's last child before rolling back the whole value
# Violations a longer container fixes: the first rollback only reopens it (its closing token masked).
_NEEDS_MORE = frozenset({"minProperties", "minItems", "required", "contains", "minContains", "dependentRequired"})


def _escape(p: str) -> str:
    return p.replace("~", "~0").replace("/", "~1")


@dataclass(frozen=True)
class GuardViolation:
    keyword: str
    path: str  # JSON path of the failing value, e.g. "/tags"
    message: str


class SchemaGuard:
    """Per compiled schema: which values to check and the check itself. Thread-safe after __init__
    (the caches only grow; a race computes the same entry twice)."""

    def __init__(self, schema: Any, guards: list[tuple[str, str]]):
        self.root = schema
        self.guards = frozenset((p, k) for p, k in guards)
        cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
        self.draft7 = cls is not jsonschema.Draft202012Validator and cls is not jsonschema.Draft201909Validator
        self.validator = cls(schema, format_checker=cls.FORMAT_CHECKER)
        self._own: dict[str, frozenset[str]] = {}
        self._nodes: dict[tuple[PathElem, ...], list[tuple[str, Any]]] = {}
        self._unique: dict[tuple[PathElem, ...], bool] = {}

    # --- schema walking -------------------------------------------------------------------------
    def _resolve(self, ref: Any) -> Optional[tuple[str, Any]]:
        if not isinstance(ref, str) or not ref.startswith("#"):
            return None
        node: Any = self.root
        parts = ref[2:].split("/") if len(ref) > 1 else []
        for raw in parts:
            part = raw.replace("~1", "/").replace("~0", "~")
            if isinstance(node, dict) and part in node:
                node = node[part]
            elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                return None
        return "/" + "/".join(parts) if parts else "/", node

    def _expand(self, nodes: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
        """Add what allOf and $ref make apply to the same value (pointers canonical, like the normalizer's)."""
        out: list[tuple[str, Any]] = []
        seen: set[str] = set()
        stack = list(nodes)
        while stack:
            ptr, node = stack.pop()
            if ptr in seen or not isinstance(node, dict):
                continue
            seen.add(ptr)
            out.append((ptr, node))
            if "$ref" in node:
                r = self._resolve(node["$ref"])
                if r is not None:
                    stack.append(r)
                if self.draft7:
                    continue  # draft <= 7: siblings of $ref are ignored
            for i, sub in enumerate(node.get("allOf") or []):
                stack.append((_join(ptr, "allOf", i), sub))
        return out

    def nodes_for(self, path: tuple[PathElem, ...]) -> list[tuple[str, Any]]:
        """(pointer, subschema) of every schema node that applies to the value at `path` for sure."""
        hit = self._nodes.get(path)
        if hit is not None:
            return hit
        if not path:
            res = self._expand([("/", self.root)])
        else:
            res = []
            for ptr, node in self.nodes_for(path[:-1]):
                res += self._children(ptr, node, path[-1])
            res = self._expand(res)
        self._nodes[path] = res
        return res

    def _children(self, ptr: str, node: dict, elem: PathElem) -> list[tuple[str, Any]]:
        out: list[tuple[str, Any]] = []
        if isinstance(elem, str):
            props = node.get("properties") or {}
            matched = False
            if elem in props:
                out.append((_join(ptr, "properties", elem), props[elem])); matched = True
            for pat, sub in (node.get("patternProperties") or {}).items():
                try:
                    if re.search(pat, elem):
                        out.append((_join(ptr, "patternProperties", pat), sub)); matched = True
                except re.error:
                    pass
            if not matched and "additionalProperties" in node:
                out.append((_join(ptr, "additionalProperties"), node["additionalProperties"]))
            return out
        items, prefix = node.get("items"), node.get("prefixItems")
        if isinstance(prefix, list) and not self.draft7:
            if elem < len(prefix):
                out.append((_join(ptr, "prefixItems", elem), prefix[elem]))
            elif isinstance(items, dict):
                out.append((_join(ptr, "items"), items))
        elif isinstance(items, list):
            if elem < len(items):
                out.append((_join(ptr, "items", elem), items[elem]))
            elif "additionalItems" in node:
                out.append((_join(ptr, "additionalItems"), node["additionalItems"]))
        elif isinstance(items, dict):
            out.append((_join(ptr, "items"), items))
        return out

    def own_keywords(self, ptr: str, node: Any) -> frozenset[str]:
        """Guarded keywords at `node` or under its non-definite edges (checked when its value closes)."""
        hit = self._own.get(ptr)
        if hit is not None:
            return hit
        found: set[str] = set()
        seen: set[str] = set()

        def visit(p: str, n: Any, top: bool) -> None:
            if not isinstance(n, dict) or p in seen:
                return
            seen.add(p)
            for k, v in n.items():
                if (p, k) in self.guards:
                    found.add(k)
                if k in _NOT_SCHEMAS or (top and k in _DEFINITE):
                    continue
                if k == "$ref":
                    r = self._resolve(v)
                    if r is not None:
                        visit(r[0], r[1], False)
                elif isinstance(v, dict):
                    if k in ("properties", "patternProperties", "dependentSchemas", "dependencies"):
                        for name, sub in v.items():
                            visit(_join(p, k, name), sub, False)
                    else:
                        visit(_join(p, k), v, False)
                elif isinstance(v, list):
                    for i, sub in enumerate(v):
                        visit(_join(p, k, i), sub, False)

        visit(ptr, node, True)
        res = frozenset(found)
        self._own[ptr] = res
        return res

    def unique_items(self, path: tuple[PathElem, ...]) -> bool:
        """A guarded `uniqueItems: true` applies to the array at `path`: checked item by item."""
        hit = self._unique.get(path)
        if hit is None:
            hit = self._unique[path] = any(n.get("uniqueItems") is True and (p, "uniqueItems") in self.guards
                                           for p, n in self.nodes_for(path))
        return hit

    def guarded(self, path: tuple[PathElem, ...]) -> bool:
        return any(self.own_keywords(p, n) for p, n in self.nodes_for(path))

    # --- checks -----------------------------------------------------------------------------------
    def check(self, path: tuple[PathElem, ...], value: Any) -> Optional[GuardViolation]:
        for ptr, node in self.nodes_for(path):
            if not self.own_keywords(ptr, node):
                continue
            err = jsonschema.exceptions.best_match(self.validator.evolve(schema=node).iter_errors(value))
            if err is not None:
                return GuardViolation(_keyword(err), _json_path(path), err.message[:200])
        return None

    def check_document(self, value: Any) -> Optional[GuardViolation]:
        err = jsonschema.exceptions.best_match(self.validator.iter_errors(value))
        return None if err is None else GuardViolation(_keyword(err), "/", err.message[:200])


def _keyword(err: Any) -> str:
    """The outermost keyword of a jsonschema error's schema path that is a guardable keyword."""
    for k in err.absolute_schema_path:
        if k in ("oneOf", "not", "if", "uniqueItems", "format", "multipleOf", "contains", "then", "else",
                 "unevaluatedProperties", "unevaluatedItems", "minProperties", "maxProperties"):
            return "if" if k in ("then", "else") else str(k)
    return str(err.validator)


def _json_equal(a: Any, b: Any) -> bool:
    """JSON Schema equality: 1 == 1.0, but true != 1; objects by members, arrays element-wise."""
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_json_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_json_equal(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


def _join(ptr: str, *parts: PathElem) -> str:
    base = "" if ptr == "/" else ptr
    return base + "".join("/" + _escape(str(p)) for p in parts)


def _json_path(path: tuple[PathElem, ...]) -> str:
    return "/" + "/".join(_escape(str(p)) for p in path)


class GuardedGrammar(CompiledGrammar):
    """A compiled grammar whose matchers carry the schema's guard."""

    def __init__(self, inner: CompiledGrammar, guard: SchemaGuard):
        self.inner = inner
        self.spec = inner.spec
        self.guard = guard
        self.compile_time_s = getattr(inner, "compile_time_s", 0.0)

    def _new_matcher(self) -> GrammarMatcher:
        return GuardedMatcher(self.inner.matcher(), self.guard)


class GuardedMatcher(GrammarMatcher):
    """A backend matcher + a guard + forbidden (position, token) pairs. See the module docstring."""

    def __init__(self, inner: GrammarMatcher, guard: SchemaGuard, backtrack_budget: int = 256):
        super().__init__(inner.vocab)
        self.inner = inner
        self.guard = guard
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
        self.guard_time_s = 0.0

    def set_backtrack_budget(self, tokens: int) -> None:
        self.backtrack_budget = int(tokens)

    # --- the mask -------------------------------------------------------------------------------
    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        super().fill_bitmask(bitmask, row)
        banned = self.forbidden.get(self._num_accepted) if self.error is None else None
        if banned:
            out = bitmask[row]
            before = out.clone()
            for t in banned:
                out[t // 32] &= ~_bit(t % 32)
            if not out.numpy().any():  # nothing else left here: allow them again (the budget bounds retries)
                out.copy_(before)

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
        self.guard_time_s += time.perf_counter() - t0
        return True

    def _rollback(self, n: int) -> None:
        self.inner._rollback(n)
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
                if any(_json_equal(value, self._value(a, b)) for a, b in c.siblings):
                    v = GuardViolation("uniqueItems", _json_path(c.path[:-1]), f"item {c.path[-1]} repeats an earlier item")
                    self._violate(v, self._token_at(self._content_start(c.start)))
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

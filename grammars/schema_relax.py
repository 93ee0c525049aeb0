"""The normalizer's policy for JSON Schema keywords a grammar may not enforce exactly: overlapping
`oneOf`, overlapping `patternProperties`, `if/then/else`, `contains`/`maxContains`, `uniqueItems`,
`propertyNames`, allOf conflicts (patterns, formats, fractional multipleOfs), min/maxProperties over
optional keys, `unevaluated*`.

Each tries the exact rewrite first (grammars/schema_logic.py). When there is none, `relax` decides by
mode: guard mode (the compiler's default) keeps a relaxed, SUPERSET grammar part and records
(schema pointer, keyword) in `guards`, which grammars/guards.py checks per closed value; strict mode
(--json-strict) raises the GrammarError naming the keyword and path; lax mode (strict_json=False) warns.

`Relaxations` is a mixin of the normalizer (grammars/json_schema.py `_Normalizer`): it reads the
normalizer's state and calls back its `node`, `inline`, `any_of` and `finish`.
"""
from __future__ import annotations

import re
import warnings as _warnings
from typing import Any, Optional

from sgl.grammars import schema_logic as logic
from sgl.grammars.errors import GrammarError
from sgl.grammars.schema_merge import is_disjoint, merge_all

# Unsupported keywords a semantic guard can check instead (guard mode; grammars/guards.py)
GUARDABLE = frozenset({"unevaluatedProperties", "unevaluatedItems"})
# characters: a maxLength at least this long beside a format goes to the guard (see
# `guard_long_format_bound`); the model rarely writes such a string, so the guard rarely rolls back
_LONG_STRING = 64
_HUGE_STRING = 1000  # beside a pattern
_COUNTED = re.compile(r"\{\d*,?\d*\}")  # a counted repetition `{n}`, `{n,m}` in a pattern
_UNMERGEABLE = frozenset({"pattern", "format", "multipleOf"})  # allOf conflicts a guard can take over
_FAMILIES = {"object": {"properties", "required", "additionalProperties", "patternProperties", "minProperties",
                        "maxProperties"},
             "string": {"minLength", "maxLength", "pattern", "format"},
             "array": {"items", "prefixItems", "minItems", "maxItems"},
             "number": {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf"}}


def pointer(path: tuple) -> str:
    """The canonical JSON pointer of a schema path (the form guards are keyed by)."""
    return "/" + "/".join(str(p).replace("~", "~0").replace("/", "~1") for p in path)


class Relaxations:
    """Exact-or-guarded handling of the keywords above (see the module docstring)."""

    strict: bool
    guard: bool
    draft7: bool
    guards: list[tuple[str, str]]
    warnings: list[str]
    in_progress: set[str]
    exact_bounds: bool
    deferred_bounds: bool

    # provided by the normalizer
    def node(self, s: Any, path: tuple) -> Any: ...
    def inline(self, schema: Any, path: tuple, seen: frozenset = frozenset()) -> Any: ...
    def any_of(self, branches: list[Any]) -> Any: ...
    def finish(self, s: Any, path: tuple) -> Any: ...

    # --- the policy ---------------------------------------------------------------------------------
    def relax(self, keyword: str, path: tuple, error: GrammarError) -> None:
        """A keyword the grammar cannot enforce at `path`: a guard (guard mode), a warning (lax), else `error`."""
        if self.guard:
            self.guards.append((pointer(path), keyword))
        elif self.strict:
            raise error
        else:
            self.warn(f"{pointer(path)}: {keyword} relaxed (strict_json=False): {error.message}")

    def warn(self, msg: str) -> None:
        self.warnings.append(msg)
        _warnings.warn(msg, stacklevel=4)

    def guard_unsupported(self, key: str, path: tuple) -> bool:
        """An unsupported keyword a guard checks per value (the grammar ignores it); False: reject it."""
        if self.guard and key in GUARDABLE:
            self.guards.append((pointer(path), key))
            return True
        return False

    def guard_property_counts(self, out: Any, path: tuple) -> Any:
        """min/maxProperties beside optional properties: counting optional keys is not in the backends'
        JSON support (llguidance rejects it), so in guard mode the guard counts them."""
        if self.guard and isinstance(out, dict) and ("minProperties" in out or "maxProperties" in out) \
                and set(out.get("properties", {})) - set(out.get("required", [])):
            for k in ("minProperties", "maxProperties"):
                if out.pop(k, None) is not None:
                    self.guards.append((pointer(path), k))
        return out

    def guard_long_format_bound(self, out: Any, path: tuple) -> Any:
        """A long `maxLength` on a string with a `format` (and no pattern): in guard mode the guard checks
        the length when the string closes. NOTE: llguidance intersects the format's regex with the length
        counter, so every character lands in a new lexer state and each mask inside the string costs
        0.4-1.4 ms (Github_easy o9778, email with maxLength 1024: 162 of that subset's 259 steps over
        200 us); without the bound the regex's states repeat (~0.1 ms). Short bounds stay in the grammar,
        and so do bounds beside a `pattern`: a counted pattern (`^(?:\\S+\\s+){0,49}\\S+$`, Github_medium
        o21142) is as slow without the bound, and the bound keeps such strings short; but not huge ones
        (`maxLength: 5000` beside `{0,99}` words, Github_easy o21053: llguidance's lexer ran out of
        expressions mid-output on the model and the request aborted)."""
        # NOTE: only beside a COUNTED pattern: an uncounted one (`^[\w\-\./]+\.php+$`, Github_medium o63939)
        # runs out of nothing, and with the bound in the guard instead, budget closing wrote a string over
        # the bound (the model's `.json.json...` for 500 tokens), the guard rolled it back at the deadline
        # and the output ended on length unparsed
        bound = out.get("maxLength", 0) if self.guard and isinstance(out, dict) else 0
        pattern = out.get("pattern") if isinstance(out.get("pattern"), str) else None
        counted = pattern is not None and _COUNTED.search(pattern) is not None
        # Deferred (an uncounted pattern's huge bound): the guard holds it, and the matcher switches to the
        # exact grammar (this bound kept) once such a string nears it (guards.py `_switch_near_bound`). So the
        # masks of the string's first ~900 characters cost ~20 us instead of ~0.5 ms, and its end is exact.
        deferred = pattern is not None and not counted and bound >= _HUGE_STRING and not self.exact_bounds
        if bound and (("format" in out and pattern is None and bound >= _LONG_STRING)
                      or (counted and bound >= _HUGE_STRING) or deferred):
            del out["maxLength"]
            self.guards.append((pointer(path), "maxLength"))
            self.deferred_bounds |= deferred
        return out

    def guard_pattern_overlap(self, out: Any, path: tuple) -> Any:
        """patternProperties whose regexes may overlap (a key matching several must satisfy each schema):
        backends require disjoint patterns, so the grammar gets ONE pattern (their alternation) whose value
        is any of their schemas (a superset) and the guard checks the object."""
        pats = out.get("patternProperties") if isinstance(out, dict) else None
        if not pats or len(pats) < 2 or not _may_overlap(list(pats)):
            return out
        self.relax("patternProperties", path, GrammarError(
            "patternProperties regexes may overlap (a key matching several must satisfy each schema)",
            keyword="patternProperties", path=pointer(path + ("patternProperties",))))
        merged = "|".join(f"(?:{p})" for p in pats)
        return dict(out, patternProperties={merged: self.any_of(list(pats.values()))})

    # --- keywords -----------------------------------------------------------------------------------
    def one_of(self, subs: list[Any], out: dict, path: tuple) -> Any:
        """oneOf: anyOf when the branches are disjoint (judged with the sibling keywords `out`), else the
        exact anyOf_i(B_i and not B_j), else (relaxed) anyOf with a guard checking "exactly one"."""
        branches = [self.node(x, path + ("oneOf", i)) for i, x in enumerate(subs)]
        family = _single_type_family(branches)
        if family is not None:
            # NOTE: exact: a value of another type matches EVERY branch, so oneOf (>= 2 branches) rejects it
            branches = [dict(b, type=family) for b in branches]
        concrete = []
        for b in branches:  # judged together with the sibling keywords (e.g. the parent's `type`)
            c = self.inline(b, path) if not self._recursive(b) else b
            if out and not self._recursive(b):
                try:
                    c = merge_all([out, c], pointer(path), inline=lambda x: self.inline(x, path))
                except GrammarError:
                    pass
            if c is not False:
                concrete.append(c)
        if is_disjoint(concrete):
            return self.any_of(branches)
        try:
            return self.exact_one_of(branches, path)
        except GrammarError:
            pass
        self.relax("oneOf", path, GrammarError(
            "oneOf branches may overlap, so 'exactly one' cannot be enforced; use anyOf, or make the "
            "branches disjoint (different types, const/enum discriminators)", keyword="oneOf",
            path=pointer(path + ("oneOf",))))
        return self.any_of(branches)  # at least one; the guard checks "exactly one"

    def exact_one_of(self, branches: list[Any], path: tuple) -> Any:
        """oneOf == anyOf_i (B_i AND NOT B_j for j != i); GrammarError if some branch has no complement."""
        inline = lambda x: self.inline(x, path)  # noqa: E731
        negs = [logic.negate(b, inline, pointer(path + ("oneOf", i))) for i, b in enumerate(branches)]
        out = []
        for i, b in enumerate(branches):
            parts = [inline(b)] + [inline(n) for j, n in enumerate(negs) if j != i]
            out.append(merge_all(parts, pointer(path + ("oneOf", i)), inline=inline))
        return self.any_of(out)

    def contains(self, s: dict, path: tuple) -> list[Any]:
        """contains/minContains/maxContains as one anyOf part (draft <= 7: no min/maxContains). Guard mode:
        a maxContains whose `contains` has no complement keeps only the lower bound in the grammar (the
        guard counts matches item by item); more required matches than positions the grammar expands
        leave the whole count to the guard."""
        if "contains" not in s:
            return []
        lo = 1 if self.draft7 else int(s.get("minContains", 1))
        hi = None if self.draft7 or "maxContains" not in s else int(s["maxContains"])
        if lo == 0 and hi is None:
            return []
        c = self.node(s["contains"], path + ("contains",))
        inline, where = (lambda x: self.inline(x, path)), pointer(path + ("contains",))
        try:
            branches = logic.contains_branches(c, lo, hi, s.get("maxItems"), inline, where)
        except GrammarError as e:
            if not self.guard:
                raise
            if hi is not None:  # `contains` has no complement: the grammar counts the lower bound only
                self.relax("maxContains", path, e)
                return self.contains({k: v for k, v in s.items() if k != "maxContains"}, path)
            self.relax("contains", path, e)  # too many required matches to expand: the guard counts them
            return []
        return [self.any_of([{"type": [x for x in logic._ALL if x != "array"]}] + branches)]

    def if_then_else(self, s: dict, path: tuple) -> list[Any]:
        """if/then/else == anyOf[if AND then, (not if) AND else], exact when `if` has a complement."""
        if "if" not in s or ("then" not in s and "else" not in s):
            return []
        cond = self.node(s["if"], path + ("if",))
        then = self.node(s.get("then", True), path + ("then",))
        other = self.node(s.get("else", True), path + ("else",))
        inline = lambda x: self.inline(x, path)  # noqa: E731
        try:
            neg = logic.negate(cond, inline, pointer(path + ("if",)))
        except GrammarError as e:
            self.relax("if", path, GrammarError(f"'if' cannot be decided by a grammar: {e.message}", keyword="if",
                                                path=pointer(path + ("if",))))
            # relaxed: (if and then) or else; the guard checks that a value failing `if` passes `else`
            yes = merge_all([inline(cond), inline(then)], pointer(path), inline=inline)
            return [self.any_of([yes, other])]
        yes = merge_all([inline(cond), inline(then)], pointer(path), inline=inline)
        no = merge_all([inline(neg), inline(other)], pointer(path), inline=inline)
        return [self.any_of([yes, no])]

    def exact_extras(self, s: dict, out: dict, path: tuple) -> Any:
        """propertyNames and uniqueItems folded into this node's own keywords `out`."""
        inline = lambda x: self.inline(x, path)  # noqa: E731
        if "propertyNames" in s:
            names = self.node(s["propertyNames"], path + ("propertyNames",))
            out = logic.property_names(out, names, inline, pointer(path + ("propertyNames",)))
            if not isinstance(out, dict):
                return out
        if s.get("uniqueItems") is not True:
            return out
        where = pointer(path + ("uniqueItems",))
        unique = logic.unique_items(out, inline, where)
        if unique is not None:
            return unique
        self.relax("uniqueItems", path, GrammarError(
            "uniqueItems: true over an infinite item domain cannot be enforced by a grammar",
            keyword="uniqueItems", path=where))
        return out

    def combine_all(self, parts: list[Any], path: tuple) -> Any:
        """allOf (and $ref + siblings) merged into one schema. Guard mode: two patterns/formats/fractional
        multipleOfs do not merge, so the grammar keeps the parts that merge (a superset) and the guard
        checks the whole node ("allOf" or "$ref" + siblings) per value."""
        inline = lambda x: self.inline(x, path)  # noqa: E731
        parts = [inline(p) for p in parts]
        try:
            merged = merge_all(parts, pointer(path), inline=inline)
        except GrammarError as e:
            if not self.guard or e.keyword not in _UNMERGEABLE:
                raise
            merged = parts[0]
            for p in parts[1:]:
                try:
                    merged = merge_all([merged, p], pointer(path), inline=inline)
                except GrammarError as e2:
                    if e2.keyword not in _UNMERGEABLE:
                        raise
            self.guards += [(pointer(path), "allOf"), (pointer(path), "$ref")]
        return self.finish(merged, path)

    def _recursive(self, b: Any) -> bool:
        return isinstance(b, dict) and set(b) == {"$ref"} and b["$ref"].rsplit("/", 1)[-1] in self.in_progress


def _may_overlap(patterns: list[str]) -> bool:
    """Whether some key may match two of `patterns` (llguidance decides; without it, assume so)."""
    try:
        from llguidance import LLMatcher
    except ImportError:
        return True
    grammar = LLMatcher.grammar_from_json_schema({"type": "object", "patternProperties": {p: {} for p in patterns}})
    is_err, msgs = LLMatcher.validate_grammar_with_warnings(grammar, None)
    return bool(is_err) and any("not disjoint" in m for m in msgs)


def _single_type_family(branches: list[Any]) -> Optional[str]:
    """The one JSON type every (untyped) branch constrains, if they all only use that type's keywords."""
    if len(branches) < 2 or not all(isinstance(b, dict) and b for b in branches):
        return None
    for fam, kws in _FAMILIES.items():
        if all(set(b) <= kws for b in branches):
            return fam
    return None


__all__ = ["Relaxations", "GUARDABLE", "pointer"]

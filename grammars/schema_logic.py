"""Exact grammar encodings of the JSON Schema keywords other engines relax: `not` (and so `if/then/else`
and overlapping `oneOf`), `propertyNames`, `uniqueItems` over finite item domains, `contains`/
`minContains`/`maxContains`.

Everything here rewrites NORMALIZED subschemas (see sgl.grammars.json_schema) into the keyword subset
every backend compiles (type, enum/const, anyOf, bounds, pattern, properties, patternProperties,
additionalProperties, prefixItems, items). A shape that has no exact rewrite raises GrammarError (the
normalizer then rejects the schema); nothing is relaxed here. Bounded expansions (array positions,
orderings) are exact on the instances they cover and REJECT the rest (sound, possibly incomplete).
"""
from __future__ import annotations

import itertools
import math
import re
from typing import Any, Callable, Optional

from sgl.grammars.errors import GrammarError
from sgl.grammars.schema_merge import merge_all

Inline = Callable[[Any], Any]
_ALL = ("array", "boolean", "null", "number", "object", "string")  # "integer" is inside "number"
_MAX_UNIQUE_ARRAYS = 512  # uniqueItems: enumerated arrays
_MAX_CONTAINS_BRANCHES = 64  # contains: position subsets
_MAX_CONTAINS_POSITIONS = 8  # contains: the C items must sit in the first 8 positions (unless maxItems <= 8)
_MAX_COMPLEMENT_CHARS = 4096  # `not` of a string enum: trie size
_OBJECT_KEYWORDS = frozenset({"properties", "required", "additionalProperties", "patternProperties",
                              "minProperties", "maxProperties"})
_ARRAY_KEYWORDS = frozenset({"items", "prefixItems", "minItems", "maxItems"})


def any_of(branches: list[Any]) -> Any:
    flat: list[Any] = []
    for b in branches:
        if b is True or b == {}:
            return {}
        if isinstance(b, dict) and set(b) == {"anyOf"}:
            flat += b["anyOf"]
        elif b is not False:
            flat.append(b)
    if not flat:
        return False
    return flat[0] if len(flat) == 1 else {"anyOf": flat}


def _type_set(s: dict) -> Optional[set[str]]:
    t = s.get("type")
    if t is None:
        return None
    return {t} if isinstance(t, str) else set(t)


def _other_types(t: set[str], where: str) -> list[str]:
    """The JSON types outside `t` (as type names for a `type` keyword)."""
    if "integer" in t and "number" not in t:
        raise GrammarError("'not integer' (non-integral numbers only) cannot be expressed", keyword="not", path=where)
    return [x for x in _ALL if x not in t]


# --- `not` -----------------------------------------------------------------------------------------
def negate(s: Any, inline: Inline, where: str) -> Any:
    """A normalized schema matching exactly the values `s` rejects. Raises GrammarError if `s` uses a
    keyword whose complement a grammar cannot express (pattern, format, multipleOf, items, ...)."""
    if s is True or s == {}:
        return False
    if s is False:
        return {}
    s = inline(s)
    if not isinstance(s, dict):
        raise GrammarError("'not' of this subschema cannot be expressed", keyword="not", path=where)
    if "const" in s or "enum" in s:  # NOTE: `finish` filtered the values by every sibling keyword
        return complement_values([s["const"]] if "const" in s else s["enum"], where)
    parts: list[Any] = []
    t = _type_set(s)
    if t is not None:
        others = _other_types(t, where)
        if others:
            parts.append({"type": others[0] if len(others) == 1 else others})

    def scoped(family: str) -> Optional[str]:
        """The type a negated keyword of `family` applies to, or None if `s`'s type excludes it."""
        if t is None:
            return family
        if family == "number":
            return "number" if "number" in t else ("integer" if "integer" in t else None)
        return family if family in t else None

    for k, v in s.items():
        if k in ("type", "anyOf"):
            continue
        if k in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
            ty = scoped("number")
            flip = {"minimum": "exclusiveMaximum", "maximum": "exclusiveMinimum",
                    "exclusiveMinimum": "maximum", "exclusiveMaximum": "minimum"}[k]
            if ty:
                parts.append({"type": ty, flip: v})
        elif k in ("minLength", "minItems", "minProperties"):
            ty = scoped({"minLength": "string", "minItems": "array", "minProperties": "object"}[k])
            if ty and v > 0:
                parts.append({"type": ty, k.replace("min", "max"): v - 1})
        elif k in ("maxLength", "maxItems", "maxProperties"):
            ty = scoped({"maxLength": "string", "maxItems": "array", "maxProperties": "object"}[k])
            if ty:
                parts.append({"type": ty, k.replace("max", "min"): v + 1})
        elif k == "required":
            if scoped("object"):
                parts += [{"type": "object", "properties": {r: False}} for r in v]
        elif k == "properties":
            if scoped("object"):
                for key, sub in v.items():
                    n = negate(sub, inline, f"{where}/properties/{key}")
                    if n is not False:
                        parts.append({"type": "object", "required": [key], "properties": {key: n}})
        else:
            raise GrammarError(f"'not' of a schema using {k!r} cannot be expressed by a grammar", keyword="not",
                               path=where)
    if "anyOf" in s:  # not(A or B) = not A and not B
        negs = [negate(b, inline, where) for b in s["anyOf"]]
        parts.append(merge_all(negs, where, inline) if all(n is not False for n in negs) else False)
    return any_of(parts)


def _num_key(v: Any) -> float:
    return float(v)


def complement_values(values: list, where: str) -> Any:
    """Every JSON value except `values` (primitives only: arrays/objects have no finite complement here)."""
    by: dict[str, list] = {x: [] for x in _ALL}
    for v in values:
        if isinstance(v, (list, dict)):
            raise GrammarError("'not' of an array or object constant cannot be expressed", keyword="not", path=where)
        kind = ("null" if v is None else "boolean" if isinstance(v, bool) else
                "number" if isinstance(v, (int, float)) else "string")
        by[kind].append(v)
    parts: list[Any] = []
    free = [x for x in _ALL if not by[x]]
    if free:
        parts.append({"type": free[0] if len(free) == 1 else free})
    if by["boolean"]:
        rest = [b for b in (False, True) if not any(b is x for x in by["boolean"])]
        if rest:
            parts.append({"enum": rest})
    if by["number"]:
        nums = sorted({_num_key(v): v for v in by["number"]}.values(), key=_num_key)
        parts.append({"type": "number", "exclusiveMaximum": nums[0]})
        parts += [{"type": "number", "exclusiveMinimum": a, "exclusiveMaximum": b} for a, b in zip(nums, nums[1:])]
        parts.append({"type": "number", "exclusiveMinimum": nums[-1]})
    if by["string"]:
        parts.append({"type": "string", "pattern": string_complement_regex(by["string"], where)})
    return any_of(parts)


def _esc(c: str) -> str:
    """One code point as an escape both Python `re` and Rust `regex` read the same way."""
    o = ord(c)
    if c.isalnum() and o < 128:
        return c
    return f"\\u{o:04x}" if o <= 0xFFFF else f"\\U{o:08x}"


# complement regex -> the strings it excludes, so that two of them merge (`complement_intersection`)
_COMPLEMENTED: dict[str, frozenset[str]] = {}


def complement_intersection(patterns: list[str], where: str) -> Optional[str]:
    """not-in(A) and not-in(B) == not-in(A | B): the merge of complement regexes of string sets (e.g.
    `shape` is neither "circle" nor "rectangle", from an overlapping oneOf's exact encoding); None if
    some pattern is not such a complement."""
    sets = [_COMPLEMENTED.get(p) for p in patterns]
    if any(x is None for x in sets):
        return None
    return string_complement_regex(sorted(frozenset().union(*sets)), where)  # type: ignore[arg-type]


def string_complement_regex(strings: list[str], where: str) -> str:
    """An anchored regex matching every string NOT in `strings` (built over their trie)."""
    if sum(len(x) + 1 for x in strings) > _MAX_COMPLEMENT_CHARS:
        raise GrammarError("'not' of this many strings is too large", keyword="not", path=where)
    trie: dict = {}
    for x in strings:
        node = trie
        for c in x:
            node = node.setdefault(c, {})
        node[""] = {}  # end marker

    def comp(node: dict) -> str:
        kids = sorted(k for k in node if k)
        alts = [] if "" in node else [""]  # ending here is outside the set unless a string ends here
        alts.append(f"[^{''.join(_esc(k) for k in kids)}][\\s\\S]*" if kids else "[\\s\\S]+")
        alts += [_esc(k) + "(?:" + comp(node[k]) + ")" for k in kids]
        return "|".join(alts)

    out = "^(?:" + comp(trie) + ")$"
    if len(_COMPLEMENTED) < 4096:  # NOTE: bounded; a miss only means two such patterns do not merge
        _COMPLEMENTED[out] = frozenset(strings)
    return out


# --- propertyNames ---------------------------------------------------------------------------------
def property_names(out: dict, names: Any, inline: Inline, where: str) -> Any:
    """`out` (a normalized object schema's own keywords) with `propertyNames: names` folded into its
    properties / patternProperties / additionalProperties."""
    names = inline(names)
    if names is True or names == {}:
        return out
    out = dict(out)
    props = dict(out.get("properties", {}))
    if names is False or (isinstance(names, dict) and (_type_set(names) or {"string"}).isdisjoint({"string"})):
        if out.get("required"):
            return _no_objects(out)
        out["properties"] = {k: False for k in props}
        out.pop("patternProperties", None)
        out["additionalProperties"] = False
        return out
    if not isinstance(names, dict):
        raise GrammarError("unsupported propertyNames", keyword="propertyNames", path=where)
    if "const" in names or "enum" in names:
        keys = [v for v in ([names["const"]] if "const" in names else names["enum"]) if isinstance(v, str)]
        if set(out.get("required", [])) - set(keys):
            return _no_objects(out)
        new = {}
        for k in keys:
            sub = _key_schema(out, k, where)
            new[k] = sub
        out["properties"] = new
        out.pop("patternProperties", None)
        out["additionalProperties"] = False
        return out
    rest = set(names) - {"type", "pattern", "minLength", "maxLength"}
    if rest:
        raise GrammarError(f"propertyNames with {sorted(rest)[0]!r} cannot be expressed by a grammar",
                           keyword="propertyNames", path=where)
    if "pattern" in names and ("minLength" in names or "maxLength" in names):
        raise GrammarError("propertyNames with both a pattern and a length cannot be expressed",
                           keyword="propertyNames", path=where)
    if "pattern" in names:
        regex = names["pattern"]
    else:
        lo, hi = names.get("minLength", 0), names.get("maxLength")
        regex = f"^[\\s\\S]{{{lo},{'' if hi is None else hi}}}$"
    try:
        ok = re.compile(regex)
    except re.error as e:
        raise GrammarError(f"propertyNames pattern does not compile: {e}", keyword="propertyNames", path=where)
    for k in list(props):
        if not ok.search(k):
            props[k] = False
    for r in out.get("required", []):
        if not ok.search(r):
            return _no_objects(out)
    out["properties"] = props
    if out.get("additionalProperties", True) is not False or out.get("patternProperties"):
        if out.get("patternProperties"):
            raise GrammarError("propertyNames with a pattern next to patternProperties cannot be expressed",
                               keyword="propertyNames", path=where)
        out["patternProperties"] = {regex: out.get("additionalProperties", {})}
        out["additionalProperties"] = False
    return out


def _key_schema(out: dict, key: str, where: str) -> Any:
    if key in out.get("properties", {}):
        return out["properties"][key]
    hits = [v for p, v in out.get("patternProperties", {}).items() if re.search(p, key)]
    if hits:
        return merge_all(hits, where, lambda x: x) if len(hits) > 1 else hits[0]
    return out.get("additionalProperties", {})


def _no_objects(out: dict) -> Any:
    """`out` when no object can match it: its other types only (False if object was its only type)."""
    t = _type_set(out)
    keep = [x for x in (_ALL if t is None else sorted(t)) if x != "object"]
    if not keep:
        return False
    rest = {k: v for k, v in out.items() if k not in _OBJECT_KEYWORDS}
    return dict(rest, type=keep[0] if len(keep) == 1 else keep)


# --- uniqueItems over a finite item domain ----------------------------------------------------------
def finite_domain(s: Any, inline: Inline) -> Optional[list]:
    """The values of `s` if it is a finite set (enum/const/boolean/null, anyOf of those), else None."""
    s = inline(s)
    if not isinstance(s, dict):
        return None
    if "const" in s:
        return [s["const"]]
    if "enum" in s:
        return list(s["enum"])
    if "anyOf" in s and len(s) == 1:
        out: list = []
        for b in s["anyOf"]:
            d = finite_domain(b, inline)
            if d is None:
                return None
            out += d
        return out
    t = _type_set(s)
    if t is not None and t <= {"boolean", "null"} and set(s) == {"type"}:
        return ([False, True] if "boolean" in t else []) + ([None] if "null" in t else [])
    return None


def json_equal(a: Any, b: Any) -> bool:
    """JSON-value equality: true != 1, 1 == 1.0, objects ignore key order."""
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(json_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(json_equal(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


def unique_items(out: dict, inline: Inline, where: str) -> Any:
    """`out` (a node's own keywords) AND uniqueItems, exactly; None if the item domain is not finite."""
    if "enum" in out or "const" in out:  # the listed arrays themselves must be unique
        out = dict(out)
        vals = [v for v in ([out.pop("const")] if "const" in out else out.pop("enum"))
                if not isinstance(v, list) or all(not json_equal(v[i], v[j]) for i in range(len(v))
                                                  for j in range(i + 1, len(v)))]
        return dict(out, enum=vals) if vals else False
    domain = None if "prefixItems" in out else finite_domain(out.get("items", {}), inline)
    if domain is None:
        return None
    arrays = unique_arrays(domain, out.get("minItems", 0), out.get("maxItems"), where)
    t = _type_set(out)
    others = [x for x in (_ALL if t is None else sorted(t)) if x != "array"]
    rest = {k: v for k, v in out.items() if k not in _ARRAY_KEYWORDS and k != "type"}
    return any_of(([dict(rest, type=others[0] if len(others) == 1 else others)] if others else [])
                  + ([{"enum": arrays}] if arrays else []))


def unique_arrays(domain: list, min_items: int, max_items: Optional[int], where: str) -> list:
    """Every array of distinct values from `domain` with a length in [min_items, max_items]."""
    dom: list = []
    for v in domain:
        if not any(json_equal(v, w) for w in dom):
            dom.append(v)
    hi = len(dom) if max_items is None else min(max_items, len(dom))
    count = sum(math.perm(len(dom), k) for k in range(min_items, hi + 1))
    if count > _MAX_UNIQUE_ARRAYS:
        raise GrammarError(f"uniqueItems over {len(dom)} values has {count} orderings (> {_MAX_UNIQUE_ARRAYS})",
                           keyword="uniqueItems", path=where)
    return [list(p) for k in range(min_items, hi + 1) for p in itertools.permutations(dom, k)]


# --- contains / minContains / maxContains -----------------------------------------------------------
def contains_branches(c: Any, lo: int, hi: Optional[int], max_items: Optional[int], inline: Inline,
                      where: str) -> list[Any]:
    """Array schemas whose union is the arrays with between `lo` and `hi` items matching `c` (items'
    own schema is merged in by the caller). Each branch fixes the set S of positions matching `c` among
    the first P; with an upper bound the other positions must NOT match `c` (needs `negate(c)`)."""
    if hi is not None and hi < lo:
        return []
    neg = negate(c, inline, where) if hi is not None else None
    positions = _MAX_CONTAINS_POSITIONS if max_items is None else min(max_items, _MAX_CONTAINS_POSITIONS)
    sizes = range(lo, (positions if hi is None else min(hi, positions)) + 1) if hi is not None else [lo]

    def count(p: int) -> int:
        return sum(math.comb(p, k) for k in sizes if k <= p)
    while positions > 0 and count(positions) > _MAX_CONTAINS_BRANCHES:
        positions -= 1
    if count(positions) == 0:
        raise GrammarError("contains with this many required matches cannot be expanded", keyword="contains",
                           path=where)
    out = []
    for k in sizes:
        for chosen in itertools.combinations(range(positions), k):
            last = chosen[-1] + 1 if chosen else 0
            other = {} if neg is None else neg
            b: dict = {"type": "array"}
            if last:
                b["prefixItems"] = [c if i in chosen else other for i in range(last)]
                b["minItems"] = last
            if neg is not None:
                b["items"] = neg  # NOTE: beyond the last chosen position, no further match (upper bound)
            out.append(b)
    return out


__all__ = ["negate", "complement_values", "string_complement_regex", "property_names", "finite_domain",
           "unique_items", "unique_arrays", "contains_branches", "any_of", "json_equal"]

"""allOf merging and oneOf disjointness for normalized schemas (see sgl.grammars.json_schema).

Both work on NORMALIZED subschemas: dicts (or booleans) whose nested ``$ref``s point into the
normalizer's defs; the `inline` callback replaces a top-level ``$ref`` by its target.
"""
from __future__ import annotations

import math
import re
from typing import Any, Callable, Optional

import jsonschema

from sgl.grammars.errors import GrammarError

JSON_TYPES = frozenset({"null", "boolean", "object", "array", "number", "integer", "string"})
_MAX_BRANCHES = 256  # allOf x anyOf distribution beyond this is refused rather than exploded

Inline = Callable[[Any], Any]


def _types(s: Any) -> Optional[frozenset[str]]:
    """The JSON types an instance of `s` can have (None: any). 'number' includes 'integer'."""
    if s is False:
        return frozenset()
    if not isinstance(s, dict):
        return None
    if "const" in s or "enum" in s:
        vals = [s["const"]] if "const" in s else s["enum"]
        return frozenset(_type_of(v) for v in vals)
    if "anyOf" in s:
        out: set[str] = set()
        for b in s["anyOf"]:
            t = _types(b)
            if t is None:
                return None
            out |= t
        return frozenset(out)
    t = s.get("type")
    if t is None:
        return None
    ts = {t} if isinstance(t, str) else set(t)
    if "number" in ts:
        ts.add("integer")
    return frozenset(ts)


def _type_of(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, int) or (isinstance(v, float) and v.is_integer()):
        return "integer"
    if isinstance(v, float):
        return "number"
    return {str: "string", list: "array", dict: "object"}[type(v)]


def _values(s: Any) -> Optional[list]:
    if isinstance(s, dict):
        if "const" in s:
            return [s["const"]]
        if "enum" in s:
            return s["enum"]
    return None


def _json_equal(a: Any, b: Any) -> bool:
    """JSON equality: true is not 1, 1 is 1.0."""
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    return a == b


def _has_ref(s: Any) -> bool:
    return "$ref" in str(s)


def _disjoint2(a: Any, b: Any) -> bool:
    ta, tb = _types(a), _types(b)
    if ta is not None and tb is not None and not (ta & tb):
        return True
    va, vb = _values(a), _values(b)
    for vals, other in ((va, b), (vb, a)):
        if vals is not None and isinstance(other, dict) and not _has_ref(other):
            try:
                validator = jsonschema.Draft202012Validator(other)
                if not any(validator.is_valid(v) for v in vals):
                    return True
            except Exception:  # noqa: BLE001
                pass
    if not (isinstance(a, dict) and isinstance(b, dict)):
        return False
    only_objects = ta == frozenset({"object"}) or tb == frozenset({"object"})
    if only_objects:
        pa, pb = a.get("properties", {}), b.get("properties", {})
        ra, rb = set(a.get("required", [])), set(b.get("required", []))
        for p in ra & rb:  # a required discriminator property with disjoint values
            if p in pa and p in pb and _disjoint2(pa[p], pb[p]):
                return True
        for x, y, rx in ((a, b, ra), (b, a, rb)):  # x requires a key that y forbids
            if y.get("additionalProperties") is False and not y.get("patternProperties"):
                if rx - set(y.get("properties", {})):
                    return True
    for lo, hi in (("minimum", "maximum"), ("exclusiveMinimum", "maximum"), ("minimum", "exclusiveMaximum")):
        for x, y in ((a, b), (b, a)):
            if lo in x and hi in y and ta is not None and ta <= {"number", "integer"}:
                if x[lo] > y[hi] or (x[lo] == y[hi] and (lo.startswith("excl") or hi.startswith("excl"))):
                    return True
    return False


def is_disjoint(branches: list[Any]) -> bool:
    """True if no JSON value can match two of `branches` (a sound, incomplete check)."""
    return all(_disjoint2(branches[i], branches[j])
               for i in range(len(branches)) for j in range(i + 1, len(branches)))


def _intersect_types(a: Any, b: Any, where: str) -> Any:
    if a is None:
        return b
    if b is None:
        return a
    sa = {a} if isinstance(a, str) else set(a)
    sb = {b} if isinstance(b, str) else set(b)
    out = sa & sb
    if "number" in sa and "integer" in sb or "number" in sb and "integer" in sa:
        out.add("integer")
    if "number" in out:
        out.discard("integer")  # number already includes integer
    if not out:
        return False
    keep = [t for t in (list(sa) + list(sb)) if t in out]
    keep = list(dict.fromkeys(keep))
    return keep[0] if len(keep) == 1 else keep


def _match_extra(s: dict, key: str) -> list[Any]:
    """The subschemas `s` applies to an object key that `s.properties` does not name."""
    hits = [v for p, v in s.get("patternProperties", {}).items() if re.search(p, key)]
    if hits:
        return hits
    return [s["additionalProperties"]] if "additionalProperties" in s else []


def _merge2(a: Any, b: Any, where: str, inline: Inline) -> Any:
    # NOTE: trivial cases first, so a recursive $ref merged with nothing stays a $ref (never inlined)
    if a is True or a == {}:
        return b
    if b is True or b == {}:
        return a
    if a is False or b is False:
        return False
    if a == b:
        return a
    a, b = inline(a), inline(b)
    for x, y in ((a, b), (b, a)):
        if "anyOf" in x:
            rest = {k: v for k, v in x.items() if k != "anyOf"}
            base = _merge2(rest, y, where, inline) if rest else y
            if len(x["anyOf"]) > _MAX_BRANCHES:
                raise GrammarError("allOf over anyOf expands to too many branches", keyword="allOf", path=where)
            branches = [_merge2(base, br, where, inline) for br in x["anyOf"]]  # base's properties first
            branches = [br for br in branches if br is not False]
            if not branches:
                return False
            return branches[0] if len(branches) == 1 else {"anyOf": branches}
    out: dict[str, Any] = {}
    t = _intersect_types(a.get("type"), b.get("type"), where)
    if t is False:
        return False
    if t is not None:
        out["type"] = t
    for k, pick in (("minimum", max), ("exclusiveMinimum", max), ("minLength", max), ("minItems", max),
                    ("minProperties", max), ("maximum", min), ("exclusiveMaximum", min), ("maxLength", min),
                    ("maxItems", min), ("maxProperties", min)):
        vals = [s[k] for s in (a, b) if k in s]
        if vals:
            out[k] = pick(vals)
    for k in ("pattern", "format", "multipleOf"):
        vals = list(dict.fromkeys(str(s[k]) for s in (a, b) if k in s))
        if len(vals) > 1:
            if k == "multipleOf" and all(float(v).is_integer() for v in vals):
                out[k] = math.lcm(*(int(float(v)) for v in vals))
                continue
            if k == "pattern":
                # NOTE: imported here: schema_logic builds on this module (merge_all)
                from sgl.grammars.schema_logic import complement_intersection
                both = complement_intersection(vals, where)
                if both is not None:
                    out[k] = both
                    continue
            raise GrammarError(f"allOf combines two different {k!r} values, which cannot be merged",
                               keyword=k, path=where)
        if vals:
            out[k] = a[k] if k in a else b[k]
    va, vb = _values(a), _values(b)
    if va is not None and vb is not None:
        common = [v for v in va if any(_json_equal(v, w) for w in vb)]
        if not common:
            return False
        out["enum"] = common
    elif va is not None or vb is not None:
        out["enum"] = va if va is not None else vb
    # arrays
    if "items" in a or "items" in b:
        out["items"] = _merge2(a.get("items", True), b.get("items", True), where + "/items", inline)
    pa, pb = a.get("prefixItems"), b.get("prefixItems")
    if pa is not None or pb is not None:
        n = max(len(pa or []), len(pb or []))
        out["prefixItems"] = [
            _merge2((pa or [])[i] if i < len(pa or []) else a.get("items", True),
                    (pb or [])[i] if i < len(pb or []) else b.get("items", True), f"{where}/prefixItems/{i}", inline)
            for i in range(n)]
    # objects
    props_a, props_b = a.get("properties", {}), b.get("properties", {})
    if props_a or props_b:
        props: dict[str, Any] = {}
        for key in list(props_a) + [k for k in props_b if k not in props_a]:
            xa = [props_a[key]] if key in props_a else _match_extra(a, key)
            xb = [props_b[key]] if key in props_b else _match_extra(b, key)
            merged: Any = True
            for part in xa + xb:
                merged = _merge2(merged, part, f"{where}/properties/{key}", inline)
            props[key] = merged
        out["properties"] = props
    pp_a, pp_b = a.get("patternProperties", {}), b.get("patternProperties", {})
    if pp_a or pp_b:
        for x, y_pp in ((a, pp_b), (b, pp_a)):
            if y_pp and x.get("additionalProperties", True) is not True:
                raise GrammarError("allOf mixing patternProperties with another branch's additionalProperties "
                                   "cannot be merged", keyword="patternProperties", path=where)
        pp = dict(pp_a)
        for k, v in pp_b.items():
            pp[k] = _merge2(pp[k], v, f"{where}/patternProperties/{k}", inline) if k in pp else v
        out["patternProperties"] = pp
    if "additionalProperties" in a or "additionalProperties" in b:
        out["additionalProperties"] = _merge2(a.get("additionalProperties", True), b.get("additionalProperties", True),
                                              where + "/additionalProperties", inline)
    req = list(dict.fromkeys(a.get("required", []) + b.get("required", [])))
    if req:
        out["required"] = req
        for r in req:  # a required key that is forbidden makes the object impossible
            if out.get("properties", {}).get(r) is False:
                return False
    if out.get("additionalProperties") is False and "properties" in out:
        out["properties"] = {k: v for k, v in out["properties"].items() if v is not False}
    return out


def merge_all(parts: list[Any], where: str, inline: Inline) -> Any:
    """allOf of normalized `parts` as ONE normalized schema (may be an anyOf, or False if empty)."""
    out: Any = True
    for p in parts:
        out = _merge2(out, p, where, inline)
        if out is False:
            return False
    return {} if out is True else out

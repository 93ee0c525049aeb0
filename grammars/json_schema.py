"""JSON Schema -> a normalized schema that every backend can compile with the same semantics.

Supported keywords (anything else that JSON Schema defines as an assertion is REJECTED with a
GrammarError naming the keyword and its path; keywords JSON Schema does not define are ignored, as the
spec says, so real-world schemas with vendor annotations still compile):

- structure: ``$ref`` (local JSON pointers incl. ``#``; recursion kept as ``$defs`` references),
  ``$defs``, ``definitions``, ``$schema``, ``$id``/``id`` (root only), annotations (``title``,
  ``description``, ``default``, ``examples``, ``deprecated``, ``readOnly``, ``writeOnly``,
  ``$comment``, ``content*``: dropped)
- any type: ``type`` (string or list), ``enum`` and ``const`` (any JSON value; filtered by their
  sibling keywords), ``anyOf``, ``oneOf`` (provably disjoint branches: anyOf; overlapping ones:
  anyOf_i(B_i and not B_j), when every branch has a complement), ``allOf`` (merged into one schema),
  ``if``/``then``/``else`` (anyOf[if and then, not-if and else], when `if` has a complement)
- numbers: ``minimum``, ``maximum``, ``exclusiveMinimum``, ``exclusiveMaximum`` (draft-4 booleans
  too), ``multipleOf``
- strings: ``minLength``, ``maxLength``, ``pattern`` (unanchored, as the spec says), ``format``
  (FORMATS below; any other format degrades to a plain string with a warning)
- arrays: ``items``, ``prefixItems``, ``additionalItems`` (draft 7 tuple form), ``minItems``,
  ``maxItems``, ``uniqueItems`` (true: over a finite item domain, enumerated), ``contains``,
  ``minContains``, ``maxContains`` (an anyOf over which of the first 8 positions match; maxContains
  needs the complement of `contains`)
- objects: ``properties``, ``required``, ``additionalProperties``, ``patternProperties``,
  ``minProperties``, ``maxProperties``; optional properties may appear in any subset, in the
  schema's property order; ``dependentRequired``, ``dependentSchemas``, ``dependencies`` (at most
  4 per object, expanded exactly into anyOf branches)
- ``propertyNames`` (enum/const, pattern, or length: folded into properties/patternProperties)
- ``not`` of a schema that has an exact complement: types (not integer alone), const/enum of
  primitives, required, properties, numeric/length/size bounds, anyOf of those (schema_logic.negate)

Semantic guards (``normalize(..., guard=True)``, the compiler's default): what no grammar enforces
exactly (overlapping oneOf without complements, uniqueItems over infinite domains, ``not`` of a general
schema, an ``if`` without a complement, ``unevaluated*``, allOf conflicts of patterns/formats, min/max
properties over optional keys) is relaxed in the grammar and listed in ``NormalizedSchema.guards``;
grammars/guards.py checks it per value while decoding. That policy (exact rewrite, else guard / reject /
warn by mode) lives in grammars/schema_relax.py.

Example:
    >>> normalize({"allOf": [{"type": "integer", "minimum": 0}, {"maximum": 9}]}).schema
    {'type': 'integer', 'minimum': 0, 'maximum': 9}
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Optional, Union
from urllib.parse import unquote

import jsonschema
from jsonschema.exceptions import SchemaError

from sgl.grammars.errors import GrammarError
from sgl.grammars import schema_logic as logic
from sgl.grammars.schema_merge import JSON_TYPES, merge_all
from sgl.grammars.schema_relax import Relaxations
from sgl.grammars.schema_relax import pointer as _pointer
from sgl.grammars.witness import matches_every_string

FORMATS = frozenset({"date-time", "date", "time", "duration", "email", "hostname", "ipv4", "ipv6", "uuid", "uri"})
ANNOTATIONS = frozenset({"title", "description", "default", "examples", "deprecated", "readOnly", "writeOnly",
                         "$comment", "contentEncoding", "contentMediaType", "contentSchema", "$schema",
                         "$id", "id", "$vocabulary", "$defs", "definitions"})
SUPPORTED = frozenset({"$ref", "type", "enum", "const", "anyOf", "oneOf", "allOf",
                       "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf",
                       "minLength", "maxLength", "pattern", "format",
                       "items", "prefixItems", "additionalItems", "minItems", "maxItems", "uniqueItems",
                       "properties", "required", "additionalProperties", "patternProperties",
                       "minProperties", "maxProperties", "dependencies", "dependentRequired",
                       "dependentSchemas", "not", "if", "then", "else", "contains", "minContains",
                       "maxContains", "propertyNames"}) | ANNOTATIONS
# JSON Schema assertions we cannot express as a grammar (or have not implemented): always rejected
# unless trivially true (see _trivial).
UNSUPPORTED = frozenset({"unevaluatedProperties", "unevaluatedItems", "$dynamicRef", "$dynamicAnchor",
                         "$recursiveRef", "$recursiveAnchor", "$anchor"})
_MAX_DEPENDENCIES = 4  # each doubles the anyOf branches
_NON_OBJECTS = [{"type": t} for t in ("array", "boolean", "null", "number", "string")]


@dataclass
class NormalizedSchema:
    """`schema`: self-contained (refs point into its own ``$defs``), annotation-free, no allOf/oneOf."""

    schema: Union[dict, bool]
    warnings: list[str] = field(default_factory=list)
    guards: list[tuple[str, str]] = field(default_factory=list)  # (schema pointer, keyword) left to guards
    deferred_bounds: bool = False  # a long maxLength went to the guard until the string nears it (guards.py)

    def to_json(self) -> str:
        return json.dumps(self.schema, separators=(",", ":"), ensure_ascii=False)


def parse_schema(value: Union[str, dict, bool]) -> Union[dict, bool]:
    if isinstance(value, (dict, bool)):
        return value
    try:
        schema = json.loads(value)
    except (TypeError, ValueError) as e:
        raise GrammarError(f"json_schema is not valid JSON: {e}") from e
    if not isinstance(schema, (dict, bool)):
        raise GrammarError("json_schema must be a JSON object (or a boolean)")
    return schema


def check_metaschema(schema: Union[dict, bool]) -> None:
    """Validate against the schema's own metaschema ($schema; default draft 2020-12)."""
    if isinstance(schema, dict) and not isinstance(schema.get("$schema", ""), str):
        raise GrammarError("$schema must be a string (a metaschema URI)", keyword="$schema", path="/")
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    try:
        cls.check_schema(schema)
    except SchemaError as e:
        path = "/" + "/".join(str(p) for p in e.path)
        raise GrammarError(f"invalid JSON schema: {e.message}", keyword=str(e.validator), path=path) from None


def _is_draft7_or_older(root: Any) -> bool:
    s = root.get("$schema", "") if isinstance(root, dict) else ""
    return any(d in s for d in ("draft-07", "draft-06", "draft-04", "draft-03"))


def _trivial(key: str, value: Any) -> bool:
    """An unsupported keyword whose value makes it a no-op."""
    if key in ("unevaluatedProperties", "unevaluatedItems"):
        return value is True or value == {}
    if key == "$anchor":
        return True  # only matters when referenced; `$ref: "#name"` is rejected at the ref
    return False


class _Normalizer(Relaxations):
    """Normalizes one schema; the keywords a grammar may not enforce exactly are Relaxations' (schema_relax.py)."""

    def __init__(self, root: Any, strict: bool, guard: bool = False, exact_bounds: bool = False):
        self.root = root
        self.strict = strict
        self.guard = guard  # relax what no grammar can enforce and record a semantic guard for it
        self.exact_bounds = exact_bounds  # keep the bounds that guard mode defers near (schema_relax.py)
        self.deferred_bounds = False  # some long bound was deferred: an exact variant exists
        self.guards: list[tuple[str, str]] = []  # (schema pointer of the node, keyword): see grammars/guards.py
        self.draft7 = _is_draft7_or_older(root)
        self.defs: dict[str, Any] = {}  # def name -> normalized schema
        self.def_names: dict[str, str] = {}  # ref pointer -> def name
        self.in_progress: set[str] = set()
        self.warnings: list[str] = []

    # --- $ref -------------------------------------------------------------------------------------
    def resolve(self, ref: str, path: tuple) -> tuple[Any, tuple]:
        if not ref.startswith("#") or (len(ref) > 1 and not ref.startswith("#/")):
            raise GrammarError(f"only local JSON-pointer references are supported, got {ref!r}", keyword="$ref",
                               path=_pointer(path))
        node, where = self.root, ()
        for raw in ref[2:].split("/") if len(ref) > 1 else []:
            part = raw.replace("~1", "/").replace("~0", "~")
            part = unquote(part)
            if isinstance(node, dict) and part in node:
                node = node[part]
            elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                raise GrammarError(f"$ref {ref!r} does not resolve", keyword="$ref", path=_pointer(path))
            where += (part,)
        return node, where

    def ref(self, ref: str, path: tuple) -> dict:
        """A `$ref` to the def for `ref`, normalizing the target once (recursion-safe)."""
        if not isinstance(ref, str):  # NOTE: draft-7 metaschema ignores $ref siblings, so type is unchecked
            raise GrammarError(f"$ref must be a string, got {type(ref).__name__}", keyword="$ref", path=_pointer(path))
        name = self.def_names.get(ref)
        if name is None:
            name = self.def_names[ref] = f"d{len(self.def_names)}"
            target, where = self.resolve(ref, path)
            self.in_progress.add(name)
            self.defs[name] = self.node(target, where)
            self.in_progress.discard(name)
        if self.defs.get(name) in (True, {}, False):  # trivial targets are inlined (backends want objects)
            return {} if self.defs[name] is not False else False
        return {"$ref": f"#/$defs/{name}"}

    def inline(self, schema: Any, path: tuple, seen: frozenset = frozenset()) -> Any:
        """`schema` with a top-level `$ref` replaced by its (normalized) target, for allOf merging."""
        while isinstance(schema, dict) and set(schema) == {"$ref"}:
            name = schema["$ref"].rsplit("/", 1)[-1]
            if name in seen or name in self.in_progress:
                raise GrammarError("allOf/$ref combination over a recursive reference cannot be merged",
                                   keyword="allOf", path=_pointer(path))
            seen = seen | {name}
            schema = self.defs[name]
        return schema

    # --- one subschema ----------------------------------------------------------------------------
    def node(self, s: Any, path: tuple) -> Any:
        if s is True:
            return {}
        if s is False:
            return False
        if not isinstance(s, dict):
            raise GrammarError("a subschema must be an object or a boolean", path=_pointer(path))
        for key, val in s.items():
            if key in UNSUPPORTED and not _trivial(key, val):
                if self.guard_unsupported(key, path):
                    continue
                raise GrammarError(f"JSON Schema keyword {key!r} is not supported by constrained decoding",
                                   keyword=key, path=_pointer(path + (key,)))
        if "$ref" in s:
            r = self.ref(s["$ref"], path + ("$ref",))
            rest = {k: v for k, v in s.items() if k in SUPPORTED and k not in ANNOTATIONS and k != "$ref"}
            if not rest or self.draft7:  # draft <= 7: siblings of $ref are ignored
                return r
            return self.combine_all([r, self.node(rest, path)], path)
        out: dict[str, Any] = {}
        types = s.get("type")
        if types is not None:
            out["type"] = types if isinstance(types, str) else list(dict.fromkeys(types))
        for k in ("minimum", "maximum", "multipleOf", "pattern"):
            if k in s:
                out[k] = s[k]
        if "pattern" in out and matches_every_string(out["pattern"]):
            # NOTE: `[A-Za-z0-9_-]*` unanchored holds for every string; as a lexeme it costs llguidance
            # ~0.5 ms per mask inside the string (a plain string: ~10 us)
            del out["pattern"]
        for k in ("minLength", "maxLength", "minItems", "maxItems", "minProperties", "maxProperties"):
            if k in s:  # the metaschema allows 2.0 here
                out[k] = int(s[k])
        for k in ("exclusiveMinimum", "exclusiveMaximum"):
            v = s.get(k)
            if isinstance(v, bool):  # draft 4: a flag on minimum/maximum
                bound = "minimum" if k == "exclusiveMinimum" else "maximum"
                if v and bound in out:
                    out[k] = out.pop(bound)
            elif v is not None:
                out[k] = v
        if "format" in s:
            if s["format"] in FORMATS:
                out["format"] = s["format"]
                if self.guard:  # the grammar's format regex may be looser than jsonschema's format checker
                    self.guards.append((_pointer(path), "format"))
            else:
                self.warn(f"{_pointer(path)}: unknown format {s['format']!r} treated as a plain string")
        if "enum" in s:
            out["enum"] = list(s["enum"])
        if "const" in s:
            out["const"] = s["const"]
        # arrays
        items = s.get("items")
        if isinstance(items, list):  # draft <= 2019 tuple form
            out["prefixItems"] = [self.node(x, path + ("items", i)) for i, x in enumerate(items)]
            if "additionalItems" in s:
                out["items"] = self.node(s["additionalItems"], path + ("additionalItems",))
        elif items is not None:
            out["items"] = self.node(items, path + ("items",))
        if isinstance(s.get("prefixItems"), list):  # (draft <= 7 does not know it: any value passes)
            out["prefixItems"] = [self.node(x, path + ("prefixItems", i)) for i, x in enumerate(s["prefixItems"])]
        # objects
        if "properties" in s:
            out["properties"] = {k: self.node(v, path + ("properties", k)) for k, v in s["properties"].items()}
        if "patternProperties" in s:
            out["patternProperties"] = {k: self.node(v, path + ("patternProperties", k))
                                        for k, v in s["patternProperties"].items()}
        if "additionalProperties" in s:
            out["additionalProperties"] = self.node(s["additionalProperties"], path + ("additionalProperties",))
        if s.get("required"):
            out["required"] = list(dict.fromkeys(s["required"]))
        out = self.exact_extras(s, out, path)
        out = self.guard_property_counts(out, path)
        out = self.guard_pattern_overlap(out, path)
        out = self.guard_long_format_bound(out, path)
        # combinators
        parts: list[Any] = [out] if out != {} else []
        parts += self.contains(s, path)
        parts += self.if_then_else(s, path)
        parts += self.dependencies(s, path)
        if "not" in s:
            try:
                parts.append(self.negate(s["not"], path + ("not",)))
            except GrammarError as e:
                self.relax("not", path, e)  # the grammar allows what `not` forbids; the guard checks it
        if "allOf" in s:
            parts += [self.node(x, path + ("allOf", i)) for i, x in enumerate(s["allOf"])]
        if "anyOf" in s:
            parts.append(self.any_of([self.node(x, path + ("anyOf", i)) for i, x in enumerate(s["anyOf"])]))
        if "oneOf" in s:
            parts.append(self.one_of(s["oneOf"], out, path))
        if not parts:
            return {}
        if len(parts) == 1:
            return self.finish(parts[0], path)
        return self.combine_all(parts, path)

    def dependencies(self, s: dict, path: tuple) -> list[Any]:
        """dependentRequired / dependentSchemas / draft-7 dependencies as exact anyOf parts:
        "if key k is present then D" == anyOf[{k absent}, allOf[{k required}, D]]."""
        deps: list[tuple[str, Any, tuple]] = []
        for kw in ("dependencies", "dependentRequired", "dependentSchemas"):
            if not isinstance(s.get(kw) or {}, dict):  # NOTE: 2020-12's metaschema does not check draft-7 keywords
                raise GrammarError(f"{kw} must be an object", keyword=kw, path=_pointer(path))
            for k, d in (s.get(kw) or {}).items():
                deps.append((k, d, path + (kw, k)))
        if len(deps) > _MAX_DEPENDENCIES:
            raise GrammarError(f"more than {_MAX_DEPENDENCIES} dependencies cannot be expanded", keyword="dependencies",
                               path=_pointer(path))
        parts = []
        for k, d, where in deps:
            then = {"required": list(d)} if isinstance(d, list) else self.node(d, where)
            absent = {"type": "object", "properties": {k: False}}
            present = merge_all([{"type": "object", "required": [k]}, self.inline(then, where)], _pointer(where),
                                inline=lambda x: self.inline(x, where))
            parts.append(self.any_of(_NON_OBJECTS + [absent] + ([present] if present is not False else [])))
        return parts

    def negate(self, sub: Any, path: tuple) -> Any:
        """`not`, exactly (see schema_logic.negate for the shapes that have a complement)."""
        return logic.negate(self.node(sub, path), lambda x: self.inline(x, path), _pointer(path))

    def any_of(self, branches: list[Any]) -> Any:
        flat: list[Any] = []
        for b in branches:
            if b == {}:
                return {}  # one branch accepts everything
            if isinstance(b, dict) and set(b) == {"anyOf"}:
                flat += b["anyOf"]
            elif b is not False:
                flat.append(b)
        if not flat:
            return False
        return flat[0] if len(flat) == 1 else {"anyOf": flat}

    def finish(self, s: Any, path: tuple) -> Any:
        """Filter enum/const by their sibling assertions (so backends see a plain value list)."""
        if not isinstance(s, dict) or ("enum" not in s and "const" not in s):
            return s
        values = [s["const"]] if "const" in s else s["enum"]
        if "const" in s and "enum" in s:
            values = [v for v in values if any(_json_equal(v, e) for e in s["enum"])]
        rest = {k: v for k, v in s.items() if k not in ("enum", "const")}
        if rest:
            check = dict(rest, **({"$defs": self.defs} if self.defs else {}))
            try:
                v = jsonschema.Draft202012Validator(check)
                values = [x for x in values if v.is_valid(x)]
            except Exception:  # noqa: BLE001 - e.g. a pattern Python cannot compile: keep the values
                pass
        if not values:
            return False
        return {"const": values[0]} if len(values) == 1 else {"enum": values}


def _json_equal(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    return a == b


def normalize(value: Union[str, dict, bool], *, strict: bool = True, guard: bool = False,
              exact_bounds: bool = False) -> NormalizedSchema:
    """Validate `value` (a JSON string or dict) and normalize it. Raises GrammarError.

    What no grammar can enforce (overlapping ``oneOf``, ``uniqueItems: true`` over infinite domains,
    ``not`` without a complement, an ``if`` with no complement): guard=True relaxes it and lists it in
    `guards` (checked per value by grammars/guards.py); else strict=True rejects it, strict=False relaxes
    it with a warning (outputs may then violate it). exact_bounds=True keeps the long string bounds that
    guard mode defers (`deferred_bounds`): the grammar a guarded matcher switches to near such a bound.
    """
    root = parse_schema(value)
    check_metaschema(root)
    n = _Normalizer(root, strict, guard, exact_bounds)
    body = n.node(root, ())
    if body is False:
        raise GrammarError("the schema allows no value (its constraints contradict each other)", path="/")
    if n.defs and isinstance(body, dict):
        used = _used_defs(body, n.defs)
        if used:
            body = dict(body, **{"$defs": {k: n.defs[k] for k in sorted(used)}})
    return NormalizedSchema(body, n.warnings, sorted(set(n.guards)), n.deferred_bounds)


def _used_defs(body: Any, defs: dict[str, Any]) -> set[str]:
    used: set[str] = set()
    stack = [body]
    while stack:
        x = stack.pop()
        if isinstance(x, dict):
            r = x.get("$ref")
            if isinstance(r, str) and r.startswith("#/$defs/"):
                name = r[len("#/$defs/"):]
                if name not in used:
                    used.add(name)
                    stack.append(defs[name])
            stack.extend(v for k, v in x.items() if k not in ("enum", "const"))
        elif isinstance(x, list):
            stack.extend(x)
    return used


__all__ = ["normalize", "NormalizedSchema", "SUPPORTED", "UNSUPPORTED", "FORMATS", "JSON_TYPES", "check_metaschema"]

"""Where semantic guards apply and the check itself: `SchemaGuard` maps a closed JSON value's path to the
schema nodes that surely apply to it (through properties / patternProperties / additionalProperties /
items / prefixItems / additionalItems / allOf / $ref) and validates the value with jsonschema against
each such node that holds a guarded keyword "of its own" (at the node, or under its anyOf / oneOf / not /
if / ... branches, which no deeper path can check). Pointers are canonical JSON pointers into the user's
schema, the same the normalizer records in `NormalizedSchema.guards` (see grammars/guards.py).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Optional

import jsonschema

from sgl.grammars.json_tracker import PathElem
from sgl.grammars.schema_logic import json_equal  # noqa: F401 - JSON Schema equality, one definition

# Edges to subschemas that apply to a value's children (or the value itself: allOf, $ref) for sure.
_DEFINITE = frozenset({"properties", "patternProperties", "additionalProperties", "items", "prefixItems",
                       "additionalItems", "allOf", "$ref"})
_NOT_SCHEMAS = frozenset({"enum", "const", "$defs", "definitions", "examples", "default", "required"})


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
        self._max_contains: dict[tuple[PathElem, ...], list[tuple[Any, int]]] = {}
        self._max_length: dict[tuple[PathElem, ...], Optional[int]] = {}
        self._validators: dict[str, Any] = {}  # schema pointer -> a validator of that node (built once)

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

    def max_contains(self, path: tuple[PathElem, ...]) -> list[tuple[Any, int]]:
        """(validator of `contains`, maxContains) of each guarded maxContains on the array at `path`: a
        prefix with more matches than that is already a violation, so items are counted as they close."""
        hit = self._max_contains.get(path)
        if hit is None:
            hit = self._max_contains[path] = [
                (self.validator.evolve(schema=n["contains"]), int(n["maxContains"])) for p, n in self.nodes_for(path)
                if (p, "maxContains") in self.guards and "contains" in n and "maxContains" in n]
        return hit

    def max_length(self, path: tuple[PathElem, ...]) -> Optional[int]:
        """The smallest guarded `maxLength` that applies to the string at `path` for sure, or None."""
        if path not in self._max_length:
            bounds = [int(n["maxLength"]) for p, n in self.nodes_for(path)
                      if (p, "maxLength") in self.guards and isinstance(n.get("maxLength"), int)]
            self._max_length[path] = min(bounds) if bounds else None
        return self._max_length[path]

    def guarded(self, path: tuple[PathElem, ...]) -> bool:
        return any(self.own_keywords(p, n) for p, n in self.nodes_for(path))

    # --- checks -----------------------------------------------------------------------------------
    def check(self, path: tuple[PathElem, ...], value: Any) -> Optional[GuardViolation]:
        for ptr, node in self.nodes_for(path):
            if not self.own_keywords(ptr, node):
                continue
            v = self._validators.get(ptr)
            if v is None:
                v = self._validators[ptr] = self.validator.evolve(schema=node)
            if v.is_valid(value):  # NOTE: stops at the first error; the best match is looked for only on a miss
                continue
            err = jsonschema.exceptions.best_match(v.iter_errors(value))
            if err is not None:
                return GuardViolation(_keyword(err), json_path(path), err.message[:200])
        return None

    def check_document(self, value: Any) -> Optional[GuardViolation]:
        err = jsonschema.exceptions.best_match(self.validator.iter_errors(value))
        return None if err is None else GuardViolation(_keyword(err), "/", err.message[:200])


def _keyword(err: Any) -> str:
    """The outermost keyword of a jsonschema error's schema path that is a guardable keyword."""
    for k in err.absolute_schema_path:
        if k in ("oneOf", "not", "if", "uniqueItems", "format", "multipleOf", "contains", "maxContains", "then",
                 "else", "unevaluatedProperties", "unevaluatedItems", "minProperties", "maxProperties",
                 "patternProperties"):
            return "if" if k in ("then", "else") else str(k)
    return str(err.validator)




def _join(ptr: str, *parts: PathElem) -> str:
    base = "" if ptr == "/" else ptr
    return base + "".join("/" + _escape(str(p)) for p in parts)


def json_path(path: tuple[PathElem, ...]) -> str:
    return "/" + "/".join(_escape(str(p)) for p in path)

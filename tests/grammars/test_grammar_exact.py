"""The exact encodings of sgl.grammars.schema_logic (not, if/then/else, overlapping oneOf, propertyNames,
uniqueItems over finite domains, contains/minContains/maxContains), walked token by token with the real
tokenizer on the default backend. Every instance's label is checked against jsonschema first, so a
wrong expectation fails too."""
from __future__ import annotations

import jsonschema
import pytest

from sgl.grammars import GrammarError, normalize_json_schema
from sgl.grammars.schema_logic import string_complement_regex

from .grammar_testlib import compact, walk

# oneOf whose branches differ only by a string const on an optional key (Glaiveai2K calculate_area): an
# object without `shape` matches every branch. Exact since "not circle" and "not square" merge into one
# complement regex (was a guard, and on the model a guard abort: every rollback landed in the same place).
SHAPES = {"type": "object", "oneOf": [{"properties": {"shape": {"const": c}}} for c in ("circle", "square", "circ")]}
CASES = [
    # (name, schema, valid instances, invalid instances)
    ("not-enum", {"type": "object", "properties": {"a": {"not": {"enum": ["x", "xy", 3, True]}}}, "required": ["a"]},
     [{"a": "xz"}, {"a": ""}, {"a": "y"}, {"a": 3.5}, {"a": False}, {"a": None}, {"a": "xyz"}],
     [{"a": "x"}, {"a": "xy"}, {"a": 3}, {"a": True}]),
    ("not-bounds", {"not": {"type": "number", "minimum": 2, "maximum": 5}},
     ["s", 1, 6, 5.5, None], [2, 3, 4.5, 5]),
    ("if-const", {"type": "object", "properties": {"kind": {"enum": ["a", "b"]}, "v": {}}, "required": ["kind", "v"],
                  "if": {"properties": {"kind": {"const": "a"}}}, "then": {"properties": {"v": {"type": "integer"}}},
                  "else": {"properties": {"v": {"type": "string"}}}},
     [{"kind": "a", "v": 1}, {"kind": "b", "v": "s"}], [{"kind": "a", "v": "s"}, {"kind": "b", "v": 1}]),
    ("if-required", {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                     "if": {"required": ["a"]}, "then": {"required": ["b"]}},
     [{}, {"b": 1}, {"a": 1, "b": 2}], [{"a": 1}]),
    ("oneOf-overlap", {"oneOf": [{"type": "number", "minimum": 0}, {"type": "number", "maximum": 10}]},
     [-5, 11, 20.5], [0, 5, 10, "s"]),
    ("oneOf-string-discriminators", SHAPES, [{"shape": "circle"}, {"shape": "square", "r": 1}],
     [{}, {"r": 1}, {"shape": "oval"}, {"shape": 1}, "circle"]),
    ("propertyNames-enum", {"type": "object", "propertyNames": {"enum": ["a", "b"]},
                            "additionalProperties": {"type": "integer"}},
     [{}, {"a": 1}, {"a": 1, "b": 2}], [{"c": 1}, {"a": "s"}]),
    ("propertyNames-pattern", {"type": "object", "propertyNames": {"pattern": "^[a-z]+$"}},
     [{}, {"ab": 1}, {"x": {"Y": 2}}], [{"A": 1}, {"a1": 1}]),
    ("propertyNames-length", {"type": "object", "propertyNames": {"maxLength": 2},
                              "properties": {"abc": {"type": "integer"}}},
     [{"ab": 1}, {}], [{"abc": 1}, {"abcd": 1}]),
    ("uniqueItems-enum", {"type": "array", "items": {"enum": ["r", "g", "b"]}, "uniqueItems": True, "minItems": 1},
     [["r"], ["g", "r"], ["b", "g", "r"]], [[], ["r", "r"], ["r", "g", "r"]]),
    ("uniqueItems-bool", {"type": "array", "items": {"type": "boolean"}, "uniqueItems": True},
     [[], [True], [False, True]], [[True, True], [False, True, False]]),
    ("contains", {"type": "array", "items": {"type": "integer"}, "contains": {"minimum": 5}},
     [[5], [1, 2, 7], [9, 1]], [[], [1, 2], [1, 2, 3, 4]]),
    ("minContains", {"type": "array", "contains": {"const": 1}, "minContains": 2},
     [[1, 1], [1, 0, 1], [2, 1, 3, 1]], [[1], [0, 1, 0]]),
    ("maxContains", {"type": "array", "contains": {"type": "string"}, "maxContains": 1},
     [["a"], [1, "a", 2]], [[], [1], ["a", "b"], ["a", 1, "b"]]),
]


@pytest.mark.parametrize("name, schema, valid, invalid", CASES, ids=[c[0] for c in CASES])
def test_exact_encoding(compiler, vocab, name, schema, valid, invalid):
    for x in valid:
        jsonschema.validate(x, schema)
    for x in invalid:
        assert not jsonschema.Draft202012Validator(schema).is_valid(x), x
    grammar = compiler.compile("json_schema", schema, timeout=30)
    assert [x for x in valid if not walk(grammar, vocab, compact(x))] == []
    assert [x for x in invalid if walk(grammar, vocab, compact(x))] == []


def test_overlapping_string_consts_need_no_guard():
    """The merge of two string complements is their union's complement: no guard is left."""
    assert normalize_json_schema(SHAPES).guards == []


@pytest.mark.parametrize("strings", [["a"], ["", "ab", "abc"], ["x\ny", "é", "\U0001f600", "a.b*"]])
def test_string_complement_regex(strings):
    import re
    rx = re.compile(string_complement_regex(strings, "/"))
    probes = strings + ["", "a", "ab", "abcd", "b", "x\n", "é!", "a.b", "a.b**", "zz"]
    for p in probes:
        assert bool(rx.search(p)) == (p not in strings), p


@pytest.mark.parametrize("schema, keyword", [
    ({"not": {"multipleOf": 2}}, "not"),
    ({"not": {"type": "integer", "minimum": 2}}, "not"),  # needs "non-integral numbers"
    ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, "uniqueItems"),
    ({"type": "array", "items": {"enum": list(range(8))}, "uniqueItems": True}, "uniqueItems"),  # 109600 orderings
    ({"propertyNames": {"format": "email"}}, "propertyNames"),
])
def test_still_rejected_with_keyword(schema, keyword):
    with pytest.raises(GrammarError) as ei:
        normalize_json_schema(schema)
    assert ei.value.keyword == keyword

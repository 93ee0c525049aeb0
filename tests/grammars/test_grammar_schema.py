"""Our JSON-schema translation layer: normalization semantics and errors naming keyword and path."""
from __future__ import annotations

import json
import time
import warnings

import pytest

from sgl.grammars import GrammarCompiler, GrammarError, normalize_json_schema

from .grammar_testlib import walk

pytestmark = pytest.mark.timeout(120)


def accepts(compiler, vocab, schema, text: str) -> bool:
    return walk(compiler.compile("json_schema", schema), vocab, text)


@pytest.mark.parametrize("schema, keyword, path", [
    ({"not": {"pattern": "a"}}, "not", "/not"),
    ({"properties": {"a": {"if": {"format": "email"}, "then": {}}}}, "if", "/properties/a/if"),
    ({"type": "array", "contains": {"pattern": "a"}, "maxContains": 1}, "not", "/contains"),
    ({"type": "array", "uniqueItems": True}, "uniqueItems", "/uniqueItems"),
    ({"oneOf": [{"type": "integer"}, {"minimum": 2}]}, "oneOf", "/oneOf"),
    ({"$ref": "http://example.com/x.json"}, "$ref", "/$ref"),
    ({"type": "strin"}, "anyOf", "/type"),                    # metaschema violation
    ({"properties": {"a": {"minLength": -1}}}, "minimum", "/properties/a/minLength"),
])
def test_rejected_with_keyword_and_path(vocab, schema, keyword, path):
    strict = GrammarCompiler(vocab, guards=False, num_threads=1)  # --json-strict: no semantic guards
    with pytest.raises(GrammarError) as ei:
        strict.validate("json_schema", json.dumps(schema))
    assert ei.value.keyword == keyword and ei.value.path == path, str(ei.value)
    assert keyword in str(ei.value) and path in str(ei.value)


def test_dependencies_and_simple_not(compiler, vocab):
    s = {"type": "object", "properties": {"card": {"type": "string"}, "billing": {"type": "string"}},
         "dependentRequired": {"card": ["billing"]}}
    assert accepts(compiler, vocab, s, '{"card":"x","billing":"y"}') and accepts(compiler, vocab, s, '{"billing":"y"}')
    assert accepts(compiler, vocab, s, "{}") and not accepts(compiler, vocab, s, '{"card":"x"}')
    s = {"type": "object", "properties": {"a": {"not": {"type": ["string", "null"]}}}, "not": {"required": ["z"]}}
    assert accepts(compiler, vocab, s, '{"a":1}') and not accepts(compiler, vocab, s, '{"a":"s"}')
    assert not accepts(compiler, vocab, s, '{"a":1,"z":0}')


def test_invalid_json_and_validate_is_fast(compiler):
    with pytest.raises(GrammarError, match="not valid JSON"):
        compiler.validate("json_schema", "{not json")
    big = {"type": "object", "properties": {f"p{i}": {"type": "string", "maxLength": 50} for i in range(100)}}
    t0 = time.perf_counter()
    compiler.validate("json_schema", json.dumps(big))
    assert time.perf_counter() - t0 < 0.5


def test_ref_recursion(compiler, vocab):
    tree = {"$defs": {"node": {"type": "object", "properties": {"v": {"type": "integer"},
                                                               "kids": {"type": "array", "items": {"$ref": "#/$defs/node"}}},
                               "required": ["v"], "additionalProperties": False}},
            "$ref": "#/$defs/node"}
    assert accepts(compiler, vocab, tree, '{"v":1,"kids":[{"v":2},{"v":3,"kids":[]}]}')
    assert not accepts(compiler, vocab, tree, '{"v":1,"kids":[{"x":2}]}')
    root_rec = {"type": "array", "items": {"anyOf": [{"type": "integer"}, {"$ref": "#"}]}}
    assert accepts(compiler, vocab, root_rec, "[1,[2,[]],3]")


def test_allof_merge(compiler, vocab):
    s = {"allOf": [{"type": "object", "properties": {"a": {"type": "integer", "minimum": 0}}, "required": ["a"]},
                   {"properties": {"a": {"maximum": 9}, "b": {"type": "string"}}, "required": ["b"]}]}
    n = normalize_json_schema(s).schema
    assert n["required"] == ["a", "b"] and n["properties"]["a"] == {"type": "integer", "minimum": 0, "maximum": 9}
    assert accepts(compiler, vocab, s, '{"a":5,"b":"x"}')
    assert not accepts(compiler, vocab, s, '{"a":10,"b":"x"}')
    assert not accepts(compiler, vocab, s, '{"a":5}')
    with pytest.raises(GrammarError) as ei:
        normalize_json_schema({"allOf": [{"pattern": "a"}, {"pattern": "b"}]})
    assert ei.value.keyword == "pattern"


def test_oneof_disjoint_is_anyof(compiler, vocab):
    s = {"oneOf": [{"type": "object", "properties": {"kind": {"const": "a"}, "x": {"type": "integer"}},
                    "required": ["kind"]},
                   {"type": "object", "properties": {"kind": {"const": "b"}, "y": {"type": "string"}},
                    "required": ["kind"]}]}
    assert "anyOf" in normalize_json_schema(s).schema
    assert accepts(compiler, vocab, s, '{"kind":"a","x":1}')
    assert accepts(compiler, vocab, s, '{"kind":"b","y":"s"}')
    assert not accepts(compiler, vocab, s, '{"kind":"c"}')
    assert normalize_json_schema({"oneOf": [{"type": "string"}, {"type": "integer"}]}).schema == \
        {"anyOf": [{"type": "string"}, {"type": "integer"}]}


def test_unknown_format_degrades_with_warning(compiler, vocab):
    with pytest.warns(UserWarning, match="unknown format 'color'"):
        n = normalize_json_schema({"type": "string", "format": "color"})
    assert n.schema == {"type": "string"} and n.warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert accepts(compiler, vocab, {"type": "string", "format": "color"}, '"red"')
    assert accepts(compiler, vocab, {"type": "string", "format": "date"}, '"2024-02-29"')
    assert not accepts(compiler, vocab, {"type": "string", "format": "date"}, '"yesterday"')


@pytest.mark.parametrize("value", [{"a": [1, {"b": None}]}, [1, "x"], "s", 3.5, None, True])
def test_const_and_enum_any_json_value(compiler, vocab, value):
    text = json.dumps(value, separators=(",", ":"))
    assert accepts(compiler, vocab, {"const": value}, text)
    assert accepts(compiler, vocab, {"enum": [0, value]}, text)
    assert not accepts(compiler, vocab, {"const": value}, "12345")


def test_enum_filtered_by_siblings():
    assert normalize_json_schema({"type": "string", "enum": ["a", 1, "b"]}).schema == {"enum": ["a", "b"]}


def test_numeric_ranges(compiler, vocab):
    s = {"type": "integer", "minimum": -5, "exclusiveMaximum": 120}
    for ok in ("-5", "0", "119"):
        assert accepts(compiler, vocab, s, ok), ok
    for bad in ("-6", "120", "1000", "1.5"):
        assert not accepts(compiler, vocab, s, bad), bad
    f = {"type": "number", "minimum": 0.5, "maximum": 2}
    assert accepts(compiler, vocab, f, "1.25") and accepts(compiler, vocab, f, "2")
    assert not accepts(compiler, vocab, f, "0.25") and not accepts(compiler, vocab, f, "2.5")


def test_string_lengths_never_explode(compiler, vocab):
    t0 = time.perf_counter()
    s = {"type": "string", "minLength": 2, "maxLength": 200}
    g = compiler.compile("json_schema", s)
    assert time.perf_counter() - t0 < 2.0  # a DFA expansion of {2,200} would take minutes
    assert walk(g, vocab, '"ab"') and walk(g, vocab, json.dumps("x" * 200))
    assert not walk(g, vocab, '"a"') and not walk(g, vocab, json.dumps("x" * 201))
    assert not walk(g, vocab, '"a\x01b"')  # raw control characters are not JSON


def test_array_counts(compiler, vocab):
    s = {"type": "array", "items": {"type": "integer"}, "minItems": 1, "maxItems": 3}
    assert accepts(compiler, vocab, s, "[1]") and accepts(compiler, vocab, s, "[1,2,3]")
    assert not accepts(compiler, vocab, s, "[]") and not accepts(compiler, vocab, s, "[1,2,3,4]")
    t = {"type": "array", "prefixItems": [{"type": "string"}, {"type": "integer"}], "items": False}
    assert accepts(compiler, vocab, t, '["a",1]') and not accepts(compiler, vocab, t, '["a",1,2]')


def test_additional_and_pattern_properties(compiler, vocab):
    s = {"type": "object", "properties": {"id": {"type": "integer"}},
         "patternProperties": {"^x_": {"type": "string"}}, "additionalProperties": False}
    assert accepts(compiler, vocab, s, '{"id":1,"x_a":"s"}')
    assert not accepts(compiler, vocab, s, '{"id":1,"x_a":2}')
    assert not accepts(compiler, vocab, s, '{"id":1,"other":2}')
    open_ = {"type": "object", "properties": {"id": {"type": "integer"}}}
    assert accepts(compiler, vocab, open_, '{"id":1,"extra":[true]}')  # additionalProperties defaults to true


def test_optional_properties_any_subset(compiler, vocab):
    s = {"type": "object", "properties": {k: {"type": "integer"} for k in "abcd"}, "required": ["c"],
         "additionalProperties": False}
    import itertools
    for r in range(4):
        for subset in itertools.combinations("abd", r):
            keys = sorted(set(subset) | {"c"})
            assert accepts(compiler, vocab, s, json.dumps({k: 1 for k in keys}, separators=(",", ":"))), keys
    assert not accepts(compiler, vocab, s, '{"a":1}')


def test_flexible_whitespace_is_bounded(vocab):
    from sgl.grammars import GrammarCompiler
    c = GrammarCompiler(vocab, json_whitespace="flexible", max_whitespace=2)
    g = c.compile("json_schema", {"type": "object", "properties": {"a": {"type": "integer"}}})
    assert walk(g, vocab, '{ "a": 1 }') and walk(g, vocab, '{"a":1}')
    assert not walk(g, vocab, '{"a":    1}')
    strict = c.compile("json_schema", {"type": "integer"})
    assert strict is not None


@pytest.mark.parametrize("pattern, dropped", [("[A-Za-z0-9_-]*", True), (".*", True), ("x?y*", True),
                                               ("^[a-z]*$", False), ("a", False), (r"\bx*", False)])
def test_pattern_every_string_matches_is_dropped(compiler, vocab, pattern, dropped):
    """An unanchored pattern that matches the empty string without an assertion holds for every string:
    the normalizer drops it (as a lexeme it made llguidance's in-string masks ~50x slower)."""
    schema = {"type": "string", "pattern": pattern}
    assert ("pattern" not in normalize_json_schema(schema).schema) == dropped
    if dropped:
        assert accepts(compiler, vocab, schema, '"A-b_9 !"')

"""Property tests: strings generated from a regex are accepted; instances generated from a schema are
accepted (hypothesis, hypothesis-jsonschema). Instances are walked in the real tokenizer's tokens."""
from __future__ import annotations

import json
import warnings

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from .grammar_testlib import compact, walk

pytestmark = pytest.mark.timeout(180)

REGEXES = [
    r"[0-9]{3}-[0-9]{4}",
    r"(foo|bar)+ [a-z]{2,5}",
    r"-?(0|[1-9][0-9]{0,8})(\.[0-9]{1,4})?",
    r"[A-Z][a-z]{1,10}( [A-Z][a-z]{1,10}){0,2}",
    r"(true|false|null)",
    r"[a-zA-Z0-9._%+-]{1,12}@[a-z0-9-]{1,10}\.(com|org)",
    r"\((x|y|z)(,(x|y|z)){0,4}\)",
]
SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                      "age": {"type": "integer", "minimum": 0, "maximum": 150},
                                      "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3}},
     "required": ["name"], "additionalProperties": False},
    {"type": "array", "items": {"anyOf": [{"type": "number"}, {"type": "boolean"}, {"type": "null"}]}, "maxItems": 4},
    {"type": "object", "properties": {"kind": {"const": "point"},
                                      "xy": {"type": "array", "prefixItems": [{"type": "integer"}, {"type": "integer"}],
                                             "items": False, "minItems": 2}},
     "required": ["kind", "xy"], "additionalProperties": False},
    {"type": "string", "pattern": "^[a-z]+[0-9]?$", "minLength": 1, "maxLength": 8},
]
FAST = settings(max_examples=40, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                       HealthCheck.function_scoped_fixture])


@pytest.mark.parametrize("regex", REGEXES)
def test_regex_generated_strings_accepted(compiler, vocab, regex):
    g = compiler.compile("regex", regex)

    @FAST
    @given(st.from_regex(regex, fullmatch=True).filter(lambda s: s.isascii()))
    def check(s: str) -> None:
        assert walk(g, vocab, s), s

    check()


def from_schema(s: dict) -> st.SearchStrategy:
    """Instances of the schema subset used above (hypothesis-jsonschema does not support current
    hypothesis)."""
    if "const" in s:
        return st.just(s["const"])
    if "enum" in s:
        return st.sampled_from(s["enum"])
    if "anyOf" in s:
        return st.one_of([from_schema(b) for b in s["anyOf"]])
    t = s.get("type")
    if t == "null":
        return st.none()
    if t == "boolean":
        return st.booleans()
    if t == "integer":
        return st.integers(s.get("minimum", -10**9), s.get("maximum", 10**9))
    if t == "number":
        return st.floats(allow_nan=False, allow_infinity=False, width=32) | st.integers(-10**6, 10**6)
    if t == "string":
        lo, hi = s.get("minLength", 0), s.get("maxLength", 20)
        if "pattern" in s:
            # NOTE: Python's `$` also matches before a final "\n"; ECMA-262's (JSON Schema's) does not.
            return st.from_regex(s["pattern"]).filter(lambda x: lo <= len(x) <= hi and x.isascii()
                                                      and not x.endswith("\n"))
        return st.text(st.characters(min_codepoint=1, max_codepoint=0x10FFFF, exclude_categories=("Cs",)),
                       min_size=lo, max_size=hi)
    if t == "array":
        pre = [from_schema(x) for x in s.get("prefixItems", [])]
        if pre:
            return st.tuples(*pre).map(list)
        return st.lists(from_schema(s.get("items", {"type": "integer"})), min_size=s.get("minItems", 0),
                        max_size=s.get("maxItems", 4))
    if t == "object":
        props, req = s.get("properties", {}), set(s.get("required", []))
        return st.fixed_dictionaries({k: from_schema(v) for k, v in props.items() if k in req},
                                     optional={k: from_schema(v) for k, v in props.items() if k not in req})
    raise AssertionError(f"unsupported test schema {s}")


@pytest.mark.parametrize("i", range(len(SCHEMAS)))
def test_schema_instances_accepted(compiler, vocab, i):
    import jsonschema
    schema = SCHEMAS[i]
    g = compiler.compile("json_schema", schema)

    @FAST
    @given(from_schema(schema))
    def check(instance) -> None:
        jsonschema.validate(instance, schema)  # the generator itself is right
        text = compact(instance)
        # NOTE: some UTF-8 lead bytes (0xF1-0xF7: U+40000 and up) are in no token of this vocabulary,
        # so no model output can contain those characters: skip what the tokenizer cannot represent.
        assume(vocab.decode(vocab.encode(text.encode())) == text.encode())
        instance = {k: instance[k] for k in schema.get("properties", {}) if k in instance} \
            if isinstance(instance, dict) else instance  # the grammar's property order
        assert walk(g, vocab, compact(instance)), compact(instance)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        check()


@FAST
@given(st.lists(st.text(st.characters(min_codepoint=32, max_codepoint=0x2FF), min_size=1, max_size=8),
                min_size=1, max_size=5, unique=True))
def test_choices_accept_exactly_the_choices(compiler, vocab, choices):
    g = compiler.compile("choices", choices)
    for c in choices:
        assert walk(g, vocab, c), c
    other = "".join(choices) + "!"
    assert not walk(g, vocab, other)

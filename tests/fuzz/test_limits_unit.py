"""runtime/limits.py without a server: the grammar-size estimate and each cap's message."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sgl.runtime.limits import MAX_NESTING, RequestLimits, check_costs, grammar_size
from sgl.runtime.protocol import GenerateRequest, RequestError, SamplingParams


@pytest.mark.parametrize("kind,value,size", [
    ("regex", "[0-9]{3}-[0-9]{4}", 8),
    ("regex", "a*b+", 2),
    ("regex", "((a{1,100}){1,100}){1,100}", 1_000_000),
    ("regex", "(ab|c){10}", 30),
    ("json_schema", json.dumps({"type": "string", "maxLength": 100000}), 100000),
    ("json_schema", json.dumps({"type": "array", "maxItems": 100, "items": {"type": "string", "maxLength": 50}}),
     100 * 51),
    ("choices", ["yes", "no"], 5),
])
def test_grammar_size(kind: str, value: object, size: int) -> None:
    assert grammar_size(kind, value) == size


def _req(**sp: object) -> GenerateRequest:
    return GenerateRequest(rid="r", text="x", sampling_params=SamplingParams.from_dict(sp))


@pytest.mark.parametrize("sp,words", [
    ({"max_new_tokens": 70000}, ["max_new_tokens", "--max-request-new-tokens"]),
    ({"stop": ["x" * 300]}, ["sampling_params.stop", "--max-stop-string-chars"]),
    ({"logit_bias": {str(i): 1.0 for i in range(2000)}}, ["sampling_params.logit_bias", "--max-logit-bias"]),
    ({"logit_bias": {"999999999": 1.0}}, ["sampling_params.logit_bias", "vocabulary"]),
    ({"regex": "a" * 70000}, ["sampling_params.regex", "--max-grammar-bytes"]),
    ({"regex": "(a{1,1000}){1,1000}"}, ["sampling_params.regex", "--grammar-max-size"]),
    ({"json_schema": json.dumps({"type": "string", "maxLength": 100000})},
     ["sampling_params.json_schema", "--grammar-max-size"]),
])
def test_each_cap_names_its_field(sp: dict, words: list[str]) -> None:
    with pytest.raises(RequestError) as info:
        check_costs([_req(**sp)], [1], RequestLimits(), vocab_size=49152)
    for w in words:
        assert w in str(info.value)


def test_prompt_and_batch_caps() -> None:
    limits = RequestLimits(max_prompt_tokens=10, max_batch_size=2)
    with pytest.raises(RequestError, match="--max-prompt-tokens"):
        check_costs([_req()], [11], limits)
    with pytest.raises(RequestError, match="--max-batch-size"):
        check_costs([_req()] * 3, [1] * 3, limits)
    check_costs([_req(max_new_tokens=8)] * 2, [10, 10], limits)  # at the limits: fine


def test_deep_nesting_is_a_request_error_not_a_recursion_error() -> None:
    deep: dict = {"type": "string"}
    for _ in range(MAX_NESTING + 5):
        deep = {"type": "array", "items": deep}
    with pytest.raises(RequestError, match="nests deeper"):
        grammar_size("json_schema", json.dumps(deep))


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=60))
def test_regex_size_never_raises_on_any_text(pattern: str) -> None:
    try:
        assert grammar_size("regex", pattern) >= 0
    except RequestError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
                        st.sampled_from(["type", "items", "maxLength", "properties", "anyOf", "pattern", "x"]),
                        inner, max_size=4), max_leaves=30))
def test_schema_size_never_raises_on_any_json(value: object) -> None:
    try:
        assert grammar_size("json_schema", json.dumps(value)) >= 0
    except RequestError:
        pass


@pytest.mark.parametrize("key", ["²", "-1", "٣"])
def test_logit_bias_key_that_is_not_an_ascii_token_id(key: str) -> None:
    with pytest.raises(RequestError, match="logit_bias"):
        check_costs([_req(logit_bias={key: 1.0})], [1], RequestLimits(), vocab_size=49152)

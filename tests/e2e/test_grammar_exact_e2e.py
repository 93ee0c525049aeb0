"""The exactly encoded keywords (not, if/then/else, overlapping oneOf, propertyNames, uniqueItems,
contains) and budget-aware closing on the default model through the Engine: every output validates
with jsonschema, and a max_new_tokens cut still parses."""
from __future__ import annotations

import json

import jsonschema
import pytest

pytestmark = pytest.mark.timeout(600)

SCHEMAS = {
    "if-then-else": {"type": "object", "properties": {"unit": {"enum": ["C", "F"]}, "temp": {"type": "number"}},
                     "required": ["unit", "temp"], "if": {"properties": {"unit": {"const": "C"}}},
                     "then": {"properties": {"temp": {"maximum": 60}}}, "else": {"properties": {"temp": {"minimum": 0}}}},
    "not+oneOf": {"type": "object", "properties": {
        "color": {"type": "string", "not": {"enum": ["red", "blue"]}, "maxLength": 12},
        "n": {"oneOf": [{"type": "number", "minimum": 0}, {"type": "number", "maximum": 10}]}},
        "required": ["color", "n"]},
    "propertyNames": {"type": "object", "propertyNames": {"enum": ["city", "country"]}, "minProperties": 1,
                      "additionalProperties": {"type": "string", "maxLength": 20}},
    "uniqueItems+contains": {"type": "object", "properties": {
        "days": {"type": "array", "items": {"enum": ["mon", "tue", "wed"]}, "uniqueItems": True, "minItems": 2},
        "scores": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "maxItems": 4,
                   "contains": {"const": 7}}}, "required": ["days", "scores"]},
}


@pytest.fixture(scope="module")
def engine():
    from sgl.runtime.engine import Engine
    eng = Engine(model_path="default", num_threads=1, max_total_tokens=8192, grammar_backend="llguidance")
    yield eng
    eng.check_integrity()
    eng.shutdown()


def test_new_keywords_produce_valid_output(engine):
    names = list(SCHEMAS)
    prompts = [f"Give a JSON example ({n}):" for n in names]
    params = [{"json_schema": json.dumps(SCHEMAS[n]), "max_new_tokens": 64, "temperature": 0} for n in names]
    for name, out in zip(names, engine.generate(prompts, params)):
        doc = json.loads(out["text"])
        jsonschema.validate(doc, SCHEMAS[name])


def test_max_tokens_cut_still_parses(engine):
    schema = {"type": "object", "properties": {"story": {"type": "string"}, "moral": {"type": "string"}},
              "required": ["story", "moral"]}
    prompt = "Write a very long, detailed story about a dragon and a knight, as JSON with fields story and moral:"
    # NOTE: a budget the sampled story always outruns (the model may close a short story itself at 64)
    for seed in (0, 1):
        out = engine.generate(prompt, {"json_schema": json.dumps(schema), "max_new_tokens": 24, "temperature": 1.0,
                                       "sampling_seed": seed})
        meta = out["meta_info"]
        jsonschema.validate(json.loads(out["text"]), schema)
        assert meta["finish_reason"]["type"] == "length" and meta["grammar_closed_early"] is True, meta
        assert meta["completion_tokens"] <= 24
        assert "grammar_incomplete" not in meta


def test_no_valid_completion_within_the_budget_is_flagged(engine):
    # the shortest valid document has 12 required keys of ~30 characters: far more than 16 tokens
    keys = [f"required_field_number_{i}_with_a_long_name" for i in range(12)]
    schema = {"type": "object", "properties": {k: {"type": "integer"} for k in keys}, "required": keys,
              "additionalProperties": False}
    out = engine.generate("A JSON object:", {"json_schema": json.dumps(schema), "max_new_tokens": 16, "temperature": 0})
    meta = out["meta_info"]
    assert meta["finish_reason"]["type"] == "length" and meta["grammar_incomplete"] is True, meta
    assert "grammar_closed_early" not in meta
    with pytest.raises(json.JSONDecodeError):
        json.loads(out["text"])
    done = engine.generate("A JSON object:", {"json_schema": json.dumps(schema), "max_new_tokens": 400,
                                              "temperature": 0})
    jsonschema.validate(json.loads(done["text"]), schema)
    assert "grammar_incomplete" not in done["meta_info"]

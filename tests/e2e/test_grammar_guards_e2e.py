"""Semantic guards with backtracking on the default model (grammars/guards.py, runtime/scheduler/rollback.py):
the keywords no grammar enforces exactly produce outputs that pass jsonschema, a greedy model that
repeats itself is rolled back (meta_info.grammar_backtracks) and still ends valid, streamed chunks never
show text that is later rolled back, and --json-strict still rejects these schemas."""
from __future__ import annotations

import json

import jsonschema
import pytest

from sgl.runtime.engine import RequestError

pytestmark = pytest.mark.timeout(600)

SCHEMAS = {
    "uniqueItems": ("List the word apple four times as a JSON array of strings:",
                    {"type": "array", "items": {"type": "string", "maxLength": 8}, "uniqueItems": True,
                     "minItems": 4, "maxItems": 4}),
    "oneOf": ("Give a country code as JSON:",
              {"type": "object", "properties": {"code": {"oneOf": [{"type": "string", "pattern": "^[a-z]+$"},
                                                                   {"type": "string", "maxLength": 3}]}},
               "required": ["code"]}),
    "not": ("Give a product code as JSON:",
            {"type": "object", "properties": {"code": {"type": "string", "maxLength": 10, "not": {"pattern": "^[0-9]"}}},
             "required": ["code"]}),
    "if": ("Give a numeric id as JSON:",
           {"type": "object", "properties": {"id": {"type": "string", "maxLength": 8}}, "required": ["id"],
            "if": {"properties": {"id": {"pattern": "^[0-9]"}}}, "then": {"properties": {"id": {"maxLength": 2}}}}),
    "format": ("Give an email address as JSON:",
               {"type": "object", "properties": {"email": {"type": "string", "format": "email", "maxLength": 40}},
                "required": ["email"]}),
}


@pytest.fixture(scope="module")
def engine():
    from sgl.runtime.engine import Engine
    eng = Engine(model_path="default", num_threads=1, max_total_tokens=8192)
    yield eng
    eng.check_integrity()
    eng.shutdown()


def _params(schema: dict) -> dict:
    return {"json_schema": json.dumps(schema), "max_new_tokens": 48, "temperature": 0}


def test_guarded_keywords_produce_valid_output(engine):
    names = list(SCHEMAS)
    outs = engine.generate([SCHEMAS[n][0] for n in names], [_params(SCHEMAS[n][1]) for n in names])
    for name, out in zip(names, outs):
        assert out["meta_info"]["finish_reason"]["type"] in ("stop", "length"), (name, out["meta_info"])
        jsonschema.validate(json.loads(out["text"]), SCHEMAS[name][1], format_checker=jsonschema.FormatChecker())
    # greedy SmolLM2 repeats "apple": only backtracking gets it to four distinct items
    unique = outs[names.index("uniqueItems")]
    assert unique["meta_info"]["grammar_backtracks"] >= 1, unique
    assert unique["meta_info"]["completion_tokens"] == len(unique["output_ids"])


def test_streamed_chunks_are_never_rolled_back(engine):
    prompt, schema = SCHEMAS["uniqueItems"]
    outs = list(engine.generate(prompt, _params(schema), stream=True))
    chunks = [c["text"] for c in outs]
    jsonschema.validate(json.loads(chunks[-1]), schema)
    assert outs[-1]["meta_info"]["grammar_backtracks"] >= 1  # text was rolled back while streaming
    for a, b in zip(chunks, chunks[1:]):
        assert b.startswith(a), f"streamed {a!r} then {b!r}: text was taken back"


def test_backtrack_budget_spent_aborts_naming_the_keyword():
    from sgl.runtime.engine import Engine
    eng = Engine(model_path="default", num_threads=1, max_total_tokens=2048, grammar_backtrack_budget=0)
    try:
        prompt, schema = SCHEMAS["uniqueItems"]
        out = eng.generate(prompt, _params(schema))
        fr = out["meta_info"]["finish_reason"]
        assert fr["type"] == "abort" and "uniqueItems" in fr["message"] and "backtrack" in fr["message"], fr
    finally:
        eng.check_integrity()
        eng.shutdown()


def test_json_strict_rejects_what_needs_a_guard():
    from sgl.runtime.engine import Engine
    eng = Engine(model_path="default", num_threads=1, max_total_tokens=2048, json_strict=True)
    try:
        with pytest.raises(RequestError, match="uniqueItems"):
            eng.generate("x", _params(SCHEMAS["uniqueItems"][1]))
    finally:
        eng.check_integrity()
        eng.shutdown()

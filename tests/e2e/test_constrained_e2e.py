"""Constrained decoding end to end on the default model (SmolLM2-135M, CPU), through the Engine:
every output satisfies its constraint, bad constraints fail at submission, mixed batches work, and
jump-forward saves forward passes."""
from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest

pytestmark = pytest.mark.timeout(600)

# The 6-field extraction workload, shared with benchmarks/bench_grammar_e2e.py.
_WORKLOAD = json.loads((Path(__file__).resolve().parents[2] / "examples/data/person_extraction.json").read_text())
PERSON, PROMPT = _WORKLOAD["schema"], _WORKLOAD["prompt"]


@pytest.fixture(scope="module")
def engine():
    from sgl.runtime.engine import Engine
    eng = Engine(model_path="default", num_threads=1, max_total_tokens=16384, grammar_backend="llguidance")
    yield eng
    eng.check_integrity()
    eng.shutdown()


def test_json_extraction_valid_over_50_seeds(engine):
    n = 50
    params = [{"json_schema": json.dumps(PERSON), "max_new_tokens": 160, "temperature": 1.0,
               "sampling_seed": seed} for seed in range(n)]
    outs = engine.generate([PROMPT] * n, params)
    for o in outs:
        assert o["meta_info"]["finish_reason"]["type"] == "stop", o
        jsonschema.validate(json.loads(o["text"]), PERSON)


def test_flush_cache_drops_compiled_grammars(engine):
    """/flush_cache resets the grammar cache too (SGLang's flush_cache resets its grammar backend): a benchmark round
    after a flush compiles its schema again, as its first round did."""
    p = {"json_schema": json.dumps(PERSON), "max_new_tokens": 160, "temperature": 0}
    first = engine.generate(PROMPT, p)
    assert engine.grammar.cache_len() >= 1
    assert engine.flush_cache()
    assert engine.grammar.cache_len() == 0
    again = engine.generate(PROMPT, p)  # compiled again: the same answer
    assert again["output_ids"] == first["output_ids"] and engine.grammar.cache_len() >= 1


def test_regex_choices_ebnf(engine):
    out = engine.generate("My phone number is ", {"regex": r"\([0-9]{3}\) [0-9]{3}-[0-9]{4}",
                                                  "max_new_tokens": 30, "temperature": 0.8, "sampling_seed": 1})
    assert re.fullmatch(r"\([0-9]{3}\) [0-9]{3}-[0-9]{4}", out["text"]), out["text"]
    out = engine.generate("The sky is", {"choices": ["blue", "green", "on fire"], "max_new_tokens": 10})
    assert out["text"] in ("blue", "green", "on fire")
    import lark
    grammar = 'start: expr\nexpr: NUM | "(" expr OP expr ")"\nOP: "+" | "*"\nNUM: /[0-9]{1,3}/'
    out = engine.generate("Arithmetic: ", {"ebnf": grammar, "max_new_tokens": 40, "temperature": 0.7,
                                           "sampling_seed": 3})
    if out["meta_info"]["finish_reason"]["type"] == "stop":
        lark.Lark(grammar).parse(out["text"])


def test_bad_constraint_is_a_request_error(engine):
    from sgl.runtime.protocol import RequestError
    with pytest.raises(RequestError, match="dynamicRef.*/properties/a"):  # (a general `not` is guarded now)
        engine.generate("x", {"json_schema": json.dumps({"properties": {"a": {"$dynamicRef": "#x"}}})})
    with pytest.raises(RequestError, match="regex"):
        engine.generate("x", {"regex": "(unclosed"})


def test_unsatisfiable_constraint_aborts_only_that_request(engine):
    # byte 0x04 is in no token of the vocabulary: the grammar dead-ends after "a"
    outs = engine.generate(["x", "y"], [{"regex": "a\\x04", "max_new_tokens": 5},
                                        {"regex": "[0-9]{3}", "max_new_tokens": 5}])
    assert outs[0]["meta_info"]["finish_reason"]["type"] == "abort"
    assert "unsatisfiable" in outs[0]["meta_info"]["finish_reason"]["message"]
    assert re.fullmatch("[0-9]{3}", outs[1]["text"])


def test_mixed_batch(engine):
    params = [{"max_new_tokens": 12, "temperature": 0},
              {"regex": "[0-9]{2,4}", "max_new_tokens": 8},
              {"json_schema": json.dumps({"type": "array", "items": {"type": "boolean"}, "maxItems": 3}),
               "max_new_tokens": 30},
              {"choices": ["yes", "no"], "max_new_tokens": 5}]
    outs = engine.generate(["Hello", "A number:", "Booleans:", "Yes or no?"], params)
    assert outs[0]["meta_info"]["completion_tokens"] > 0
    assert re.fullmatch("[0-9]{2,4}", outs[1]["text"]), outs[1]["text"]
    assert isinstance(json.loads(outs[2]["text"]), list)
    assert outs[3]["text"] in ("yes", "no")


def test_jump_forward_saves_forward_passes(engine):
    """Fixed keys: forced text (keys, punctuation) is appended without a decode step per token."""
    from sgl.runtime.engine import Engine
    schema = {"type": "object", "properties": {k: {"type": "integer", "minimum": 0, "maximum": 9}
                                               for k in ("first_value", "second_value", "third_value")},
              "required": ["first_value", "second_value", "third_value"], "additionalProperties": False}
    p = {"json_schema": json.dumps(schema), "max_new_tokens": 80, "temperature": 0}

    def steps(eng) -> tuple[int, str]:
        eng.flush_cache()
        before = eng.get_stats()["num_steps"]
        out = eng.generate("Three digits as JSON:", p)
        return eng.get_stats()["num_steps"] - before, out["text"]

    with_jf, text = steps(engine)
    slow = Engine(model_path="default", num_threads=1, max_total_tokens=4096, disable_jump_forward=True)
    try:
        without_jf, text2 = steps(slow)
    finally:
        slow.shutdown()
    jsonschema.validate(json.loads(text), schema)
    jsonschema.validate(json.loads(text2), schema)
    assert with_jf <= 0.7 * without_jf, (with_jf, without_jf)


@pytest.mark.timeout(120)
def test_compile_failure_ends_that_request_and_the_engine_serves_on(engine):
    """A grammar that fails to compile after validation (here: the compile timeout) ends that request
    with abort naming the failure; the scheduler thread lives on (the failure message was once built
    from an `except` variable Python had already cleared: NameError, dead scheduler, hung requests)."""
    timeout = engine.grammar.compile_timeout_s
    engine.grammar.compile_timeout_s = 1e-9  # the timer fires long before this compile (tens of ms) ends
    big = {"type": "object",
           "properties": {f"f{i}": {"type": "string", "pattern": f"^x{i}[a-z]+$"} for i in range(200)}}
    try:
        out = engine.generate("JSON: ", {"json_schema": json.dumps(big), "max_new_tokens": 8})
    finally:
        engine.grammar.compile_timeout_s = timeout
    reason = out["meta_info"]["finish_reason"]
    assert reason["type"] == "abort" and "grammar compilation failed" in reason["message"], reason
    out = engine.generate("Digits: ", {"regex": "[0-9]{4}", "max_new_tokens": 8, "temperature": 0})
    assert re.fullmatch("[0-9]{4}", out["text"]), out

"""GenParams: one definition of the DSL's sampling parameters, mapped onto the runtime's names."""

from __future__ import annotations

import dataclasses
import inspect
import json

import pydantic
import pytest

import sgl
from sgl.runtime.protocol import RequestError, SamplingParams
from sgl.sampling import REGEX_BOOL, REGEX_FLOAT, REGEX_INT, REGEX_STR, GenParams, parse_value

RENAMED = {"max_tokens": "max_new_tokens", "min_tokens": "min_new_tokens"}


def test_sampling_fields_are_runtime_fields():
    runtime = {f.name for f in dataclasses.fields(SamplingParams)}
    assert set(GenParams.names("sampling")) <= runtime


def test_gen_signature_covers_every_param():
    gen_args = {RENAMED.get(p, p) for p in inspect.signature(sgl.gen).parameters}
    assert set(GenParams.names()) <= gen_args
    # and every gen argument is either a GenParams field or one of gen's own
    assert gen_args - set(GenParams.names()) == {"name", "choices", "choices_method"}


def test_every_gen_param_reaches_the_request():
    values = dict(max_tokens=9, min_tokens=1, n=2, stop=["x"], stop_token_ids=[5], stop_regex=["y+"],
                  temperature=0.3, top_p=0.9, top_k=5, min_p=0.1, frequency_penalty=0.5, presence_penalty=0.25,
                  repetition_penalty=1.1, ignore_eos=True, sampling_seed=7, regex="a+", return_logprob=True,
                  logprob_start_len=3, top_logprobs_num=2, return_text_in_logprobs=True, prediction="expected")
    node = sgl.gen("v", **values)
    sp, opts = node.params.to_sampling_params(), node.params.request_options()
    for k, v in values.items():
        key = RENAMED.get(k, k)
        assert (sp | opts)[key] == v, key
    SamplingParams.from_dict(sp)


@pytest.mark.parametrize("dtype,regex,stop", [(int, REGEX_INT, [" ", "\n"]), ("float", REGEX_FLOAT, [" ", "\n"]),
                                              (str, REGEX_STR, None), (bool, REGEX_BOOL, None)])
def test_dtype_becomes_sglangs_regex(dtype, regex, stop):
    sp = sgl.gen("v", dtype=dtype).params.to_sampling_params()
    assert sp["regex"] == regex
    assert sp.get("stop") == stop


def test_dtype_keeps_user_stop():
    assert sgl.gen_int("v", stop="!").params.to_sampling_params()["stop"] == ["!", " ", "\n"]


def test_bad_params_raise_at_the_gen_call():
    with pytest.raises(RequestError, match="top_p"):
        sgl.gen("v", top_p=2.0)
    with pytest.raises(RequestError, match="dtype"):
        sgl.gen("v", dtype=list)
    with pytest.raises(RequestError, match="either dtype or regex"):
        sgl.gen("v", dtype=int, regex="[0-9]")
    with pytest.raises(RequestError, match="at most one"):
        sgl.gen("v", regex="a", ebnf="root ::= 'a'")


class Person(pydantic.BaseModel):
    name: str
    age: int


@pytest.mark.parametrize("schema", ['{"type": "object"}', {"type": "object"}, Person])
def test_json_schema_forms(schema):
    sp = sgl.gen("v", json_schema=schema).params.to_sampling_params()
    assert isinstance(sp["json_schema"], str)
    json.loads(sp["json_schema"])


def test_merge_and_extra_stop():
    p = GenParams(max_new_tokens=4, stop="a").merged(GenParams(max_new_tokens=99, temperature=0.0))
    assert (p.max_new_tokens, p.temperature, p.stop) == (4, 0.0, "a")
    assert p.with_extra_stop(["<|im_end|>", ""]).stop == ["a", "<|im_end|>"]
    assert GenParams().with_extra_stop([]).stop is None


def test_parse_value():
    assert parse_value("-12\n", "int") == -12
    assert parse_value("3.5", "float") == 3.5
    assert parse_value("False", "bool") is False
    assert parse_value('"hi there"', "str") == "hi there"
    assert parse_value('{"name": "Ada", "age": 36}', schema=Person) == Person(name="Ada", age=36)
    with pytest.raises(ValueError):
        parse_value("maybe", "bool")

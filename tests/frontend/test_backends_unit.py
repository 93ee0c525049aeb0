"""Backend pieces that need no server: request batching and the OpenAI request mapping."""

from __future__ import annotations

import json

import pytest

import sgl
from sgl.backends.base import Prompt
from sgl.backends.runtime_endpoint import _error, _merge
from sgl.runtime.protocol import RequestError
from sgl.sampling import GenParams


def test_merge_batches_bodies_that_differ_only_in_prompt():
    a = {"text": "x", "sampling_params": {"max_new_tokens": 0}, "return_logprob": True, "logprob_start_len": 3}
    b = {**a, "text": "y"}
    assert _merge([a, b]) == {"text": ["x", "y"], "sampling_params": {"max_new_tokens": 0}, "return_logprob": True,
                              "logprob_start_len": 3}
    c = {**b, "sampling_params": {"max_new_tokens": 2}}
    assert _merge([a, c])["sampling_params"] == [{"max_new_tokens": 0}, {"max_new_tokens": 2}]
    assert _merge([a, {**b, "logprob_start_len": 4}]) is None  # different options: sent separately
    assert _merge([a, {**b, "sampling_params": {"n": 2}}]) is None


def test_http_errors_map_to_the_engines_types():
    assert isinstance(_error(400, {"error": {"message": "bad top_p"}}), RequestError)
    err = _error(500, {"error": {"message": "boom"}})
    assert isinstance(err, sgl.BackendError) and "boom" in str(err)


def test_openai_request_mapping():
    oa = sgl.OpenAI("m", base_url="http://127.0.0.1:9/v1")  # no request is sent
    prompt = Prompt("...", [{"role": "user", "content": "hi"}], role="assistant")
    schema = {"type": "object"}
    kw = oa._request(prompt, GenParams(max_new_tokens=8, temperature=0, json_schema=json.dumps(schema), top_k=5))
    assert kw["max_tokens"] == 8 and kw["temperature"] == 0 and kw["messages"] == prompt.messages
    assert kw["response_format"]["json_schema"]["schema"] == schema
    assert kw["extra_body"] == {"top_k": 5}
    assert oa._request(prompt, GenParams(prediction="hi there"))["prediction"] == {"type": "content",
                                                                                 "content": "hi there"}

    strict = sgl.OpenAI("m", base_url="http://127.0.0.1:9/v1", extra_fields=False)
    with pytest.raises(sgl.UnsupportedFeatureError, match="regex"):
        strict._request(prompt, GenParams(regex="a+"))
    with pytest.raises(sgl.UnsupportedFeatureError, match="select"):
        strict.select(prompt, ["a", "b"], 0.0, sgl.token_length_normalized)
    with pytest.raises(sgl.UnsupportedFeatureError, match="right after"):
        oa._request(Prompt("...", [], role="user"), GenParams())

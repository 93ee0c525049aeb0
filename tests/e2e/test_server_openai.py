"""The OpenAI API against a real server, through the official `openai` SDK."""

from __future__ import annotations

import json
import re
from typing import Iterator

import httpx
import jsonschema
import openai
import pytest

from tests.e2e.server_helpers import ServerHandle, running_server

pytestmark = pytest.mark.timeout(300)

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def server() -> Iterator[ServerHandle]:
    with running_server() as handle:
        yield handle
    assert handle.proc.returncode == 0, handle.log()[-3000:]


@pytest.fixture(scope="module")
def client(server: ServerHandle) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def prompt_tokens(server: ServerHandle, text: str) -> int:
    r = httpx.post(server.url + "/generate", json={"text": text, "sampling_params": {"max_new_tokens": 0}})
    return r.json()["meta_info"]["prompt_tokens"]


def test_models(client: openai.OpenAI) -> None:
    models = client.models.list().data
    assert [m.id for m in models] == ["default"]


def test_completion_and_usage(server: ServerHandle, client: openai.OpenAI) -> None:
    r = client.completions.create(model="default", prompt="The capital of France is", max_tokens=8, temperature=0)
    choice = r.choices[0]
    assert "Paris" in choice.text
    assert r.object == "text_completion" and r.id.startswith("cmpl-")
    assert r.usage.prompt_tokens == prompt_tokens(server, "The capital of France is") == 5
    assert r.usage.completion_tokens <= 8 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    if choice.finish_reason == "length":
        assert r.usage.completion_tokens == 8


def test_completion_stream_matches(client: openai.OpenAI) -> None:
    kwargs = dict(model="default", prompt="Once upon a time", max_tokens=10, temperature=0)
    full = client.completions.create(**kwargs)
    chunks = list(client.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == full.choices[0].text
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [full.choices[0].finish_reason]


def test_completion_batch_prompts_n_and_echo(client: openai.OpenAI) -> None:
    r = client.completions.create(model="default", prompt=["Hello", "Goodbye"], max_tokens=3, n=2,
                                  temperature=0.8, seed=1)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    echo = client.completions.create(model="default", prompt="Hi there", max_tokens=2, echo=True)
    assert echo.choices[0].text.startswith("Hi there")


def test_completion_logprobs(client: openai.OpenAI) -> None:
    r = client.completions.create(model="default", prompt="1, 2, 3,", max_tokens=4, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == r.usage.completion_tokens
    assert "".join(lp.tokens) == r.choices[0].text
    for val, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert val <= 0 and len(top) == 2 and abs(max(top.values()) - val) < 1e-4


def test_chat_completion(server: ServerHandle, client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model="default", messages=QUESTION, max_tokens=20, temperature=0)
    msg = r.choices[0].message
    assert msg.role == "assistant" and "Paris" in msg.content
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert r.usage.completion_tokens >= 1
    assert r.usage.prompt_tokens > 10  # the template's system prompt and role markers are counted
    cm = client.chat.completions.create(model="default", messages=QUESTION, max_completion_tokens=3, temperature=0)
    assert cm.usage.completion_tokens <= 3 and msg.content.startswith(cm.choices[0].message.content)


def test_chat_stream_with_usage(client: openai.OpenAI) -> None:
    kwargs = dict(model="default", messages=QUESTION, max_tokens=12, temperature=0)
    full = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage.completion_tokens == full.usage.completion_tokens
    assert usage.prompt_tokens == full.usage.prompt_tokens


def test_chat_n_and_seed_reproducible(client: openai.OpenAI) -> None:
    kwargs = dict(model="default", messages=[{"role": "user", "content": "Name an animal."}], max_tokens=8,
                  temperature=1.0, n=3)
    a = client.chat.completions.create(**kwargs, seed=1234)
    b = client.chat.completions.create(**kwargs, seed=1234)
    c = client.chat.completions.create(**kwargs, seed=99)
    texts = lambda r: [ch.message.content for ch in r.choices]  # noqa: E731
    assert len(a.choices) == 3 and [ch.index for ch in a.choices] == [0, 1, 2]
    assert texts(a) == texts(b), "the same seed must reproduce the same choices"
    assert texts(a) != texts(c)
    assert 3 <= a.usage.completion_tokens <= 24, "completion tokens sum over the 3 choices"
    assert a.usage.prompt_tokens == client.chat.completions.create(
        **{**kwargs, "n": 1}, seed=1234).usage.prompt_tokens, "prompt tokens count once, not per choice"


def test_chat_logprobs(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model="default", messages=QUESTION, max_tokens=6, temperature=0,
                                       logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    assert "".join(t.token for t in content) == r.choices[0].message.content
    for t in content:
        assert len(t.top_logprobs) == 3 and abs(t.top_logprobs[0].logprob - t.logprob) < 1e-4
        assert bytes(t.bytes).decode("utf-8", errors="replace") == t.token


def test_chat_stop(client: openai.OpenAI) -> None:
    full = client.chat.completions.create(model="default", messages=QUESTION, max_tokens=20, temperature=0)
    word = full.choices[0].message.content.split()[2]
    r = client.chat.completions.create(model="default", messages=QUESTION, max_tokens=20, temperature=0, stop=[word])
    assert r.choices[0].finish_reason == "stop"
    assert word not in r.choices[0].message.content
    assert full.choices[0].message.content.startswith(r.choices[0].message.content)


def test_json_schema_response_format(client: openai.OpenAI) -> None:
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
              "required": ["name", "age"], "additionalProperties": False}
    r = client.chat.completions.create(
        model="default", messages=[{"role": "user", "content": "Invent a person. Reply in JSON."}], max_tokens=48,
        temperature=0, response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema}})
    jsonschema.validate(json.loads(r.choices[0].message.content), schema)
    obj = client.chat.completions.create(
        model="default", messages=[{"role": "user", "content": "Describe Paris as JSON."}], max_tokens=32,
        temperature=0, response_format={"type": "json_object"})
    if obj.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(obj.choices[0].message.content), dict)


def test_regex_extra_body(client: openai.OpenAI) -> None:
    r = client.completions.create(model="default", prompt="My phone number is", max_tokens=16, temperature=0,
                                  extra_body={"regex": r" \d{3}-\d{4}"})
    assert re.fullmatch(r" \d{3}-\d{4}", r.choices[0].text), r.choices[0].text


def test_errors_use_openai_shape(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="default", messages=QUESTION, max_tokens=4, temperature=-1)
    assert "temperature" in str(e.value.message)
    assert e.value.body["type"] == "BadRequestError" or e.value.body.get("message")
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="default", prompt="Hi", max_tokens=4, n=999)
    assert "n must be" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="default", messages=QUESTION, max_tokens=4, extra_body={"top_k": "x"})
    assert "top_k" in e.value.message
    # the server keeps serving
    assert client.completions.create(model="default", prompt="Hi", max_tokens=2).choices[0].text is not None

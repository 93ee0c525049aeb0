"""Bad input gets a 4xx naming the field, and the server keeps serving. Also `--api-key` and
`--max-request-bytes`. One server (with an API key) for the module."""

from __future__ import annotations

from typing import Any, Iterator, Optional

import httpx
import openai
import pytest

from tests.e2e.server_helpers import ServerHandle, running_server

pytestmark = pytest.mark.timeout(300)

KEY = "test-secret-key"
MAX_BYTES = 200_000


@pytest.fixture(scope="module")
def server() -> Iterator[ServerHandle]:
    with running_server("--max-request-bytes", str(MAX_BYTES), "--context-length", "512", api_key=KEY) as handle:
        yield handle
    assert handle.proc.returncode == 0, handle.log()[-3000:]


@pytest.fixture(scope="module")
def client(server: ServerHandle) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, headers=server.headers, timeout=60) as c:
        yield c


def still_serving(client: httpx.Client) -> None:
    r = client.post("/generate", json={"text": "Hello", "sampling_params": {"max_new_tokens": 1}})
    assert r.status_code == 200, r.text
    assert r.json()["meta_info"]["completion_tokens"] == 1


def expect_error(r: httpx.Response, status: int, *words: str) -> None:
    assert r.status_code == status, (r.status_code, r.text)
    err = r.json()["error"]
    assert err["code"] == status and isinstance(err["message"], str)
    for w in words:
        assert w.lower() in err["message"].lower(), (w, err["message"])


GEN_CASES: list[tuple[str, Any, tuple[str, ...]]] = [
    ("wrong type text", {"text": 5}, ("text",)),
    ("text and input_ids", {"text": "a", "input_ids": [1]}, ("text", "input_ids")),
    ("no prompt", {"sampling_params": {}}, ("text",)),
    ("unknown sampling key", {"text": "a", "sampling_params": {"max_tokens": 4}}, ("max_tokens",)),
    ("max_new_tokens string", {"text": "a", "sampling_params": {"max_new_tokens": "8"}}, ("max_new_tokens",)),
    ("negative max_new_tokens", {"text": "a", "sampling_params": {"max_new_tokens": -1}}, ("max_new_tokens",)),
    ("huge max_new_tokens", {"text": "a", "sampling_params": {"max_new_tokens": 10**9}}, ("max_new_tokens",)),
    ("temperature type", {"text": "a", "sampling_params": {"temperature": "hot"}}, ("temperature",)),
    ("top_p range", {"text": "a", "sampling_params": {"top_p": 0}}, ("top_p",)),
    ("stop type", {"text": "a", "sampling_params": {"stop": 7}}, ("stop",)),
    ("two constraints", {"text": "a", "sampling_params": {"regex": "a+", "json_schema": "{}"}}, ("regex",)),
    ("bad regex", {"text": "a", "sampling_params": {"regex": "(unclosed"}}, ("regex",)),
    ("bad json schema", {"text": "a", "sampling_params": {"json_schema": "{not json"}}, ("json",)),
    ("empty prompt", {"text": "", "sampling_params": {"max_new_tokens": 1}}, ("text",)),
    ("empty input_ids", {"input_ids": [], "sampling_params": {"max_new_tokens": 1}}, ("input_ids",)),
    ("token out of vocab", {"input_ids": [1, 10**7]}, ("input_ids",)),
    ("prompt over context", {"input_ids": [100] * 600, "sampling_params": {"max_new_tokens": 1}}, ("context",)),
    ("text over context", {"text": "word " * 700, "sampling_params": {"max_new_tokens": 1}}, ("context",)),
    ("n over limit", {"text": "a", "sampling_params": {"n": 17}}, ("n",)),
    ("logprob_start_len type", {"text": "a", "logprob_start_len": "x"}, ("logprob_start_len",)),
    ("top_logprobs_num range", {"text": "a", "return_logprob": True, "top_logprobs_num": 99}, ("top_logprobs_num",)),
    ("batch params mismatch", {"text": ["a", "b"], "sampling_params": [{}]}, ("sampling_params",)),
    ("body not an object", [1, 2, 3], ("object",)),
]


@pytest.mark.parametrize("name,body,words", GEN_CASES, ids=[c[0] for c in GEN_CASES])
def test_generate_rejects(client: httpx.Client, name: str, body: Any, words: tuple[str, ...]) -> None:
    expect_error(client.post("/generate", json=body), 400, *words)
    still_serving(client)


def test_stream_request_errors_before_streaming(client: httpx.Client) -> None:
    r = client.post("/generate", json={"text": "a", "stream": True, "sampling_params": {"top_k": 0}})
    expect_error(r, 400, "top_k")
    still_serving(client)


@pytest.mark.parametrize("raw,words", [
    (b'{"text": "hi", ', ("malformed json",)),
    (b'{"text": "\xff\xfe"}', ("utf-8",)),
    (b"", ("empty",)),
], ids=["malformed", "invalid-utf8", "empty-body"])
def test_raw_body_errors(client: httpx.Client, raw: bytes, words: tuple[str, ...]) -> None:
    r = client.post("/generate", content=raw, headers={"content-type": "application/json"})
    expect_error(r, 400, *words)
    still_serving(client)


def test_body_size_limit(client: httpx.Client) -> None:
    big = {"text": "x" * (MAX_BYTES + 10)}
    expect_error(client.post("/generate", json=big), 400, "max-request-bytes")

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit applies while reading
        yield b'{"text": "'
        for _ in range(30):
            yield b"y" * 10_000
        yield b'"}'

    r = client.post("/generate", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    still_serving(client)


@pytest.mark.parametrize("headers,status", [({}, 401), ({"Authorization": "Bearer wrong"}, 401),
                                            ({"Authorization": KEY}, 401)], ids=["missing", "wrong", "no-bearer"])
def test_api_key_required(server: ServerHandle, headers: dict[str, str], status: int) -> None:
    for method, path in (("POST", "/generate"), ("GET", "/model_info"), ("GET", "/v1/models"),
                         ("GET", "/metrics"), ("POST", "/flush_cache"), ("GET", "/health_generate")):
        r = httpx.request(method, server.url + path, headers=headers, json={"text": "hi"})
        expect_error(r, status, "api key")
    assert httpx.get(server.url + "/health").status_code == 200, "/health stays open for probes"


def test_openai_sdk_auth(server: ServerHandle) -> None:
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    good = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
    assert good.models.list().data[0].id == "default"


OPENAI_CASES: list[tuple[str, str, dict[str, Any], tuple[str, ...]]] = [
    ("chat no messages", "/v1/chat/completions", {"model": "m"}, ("messages",)),
    ("chat empty messages", "/v1/chat/completions", {"messages": []}, ("messages",)),
    ("chat bad role", "/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, ("role",)),
    ("chat max_tokens type", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": "x"}], "max_tokens": "5"}, ("max_tokens",)),
    ("chat top_logprobs without logprobs", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, ("top_logprobs",)),
    ("chat image part", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, ("image_url",)),
    ("chat over context", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": "word " * 700}], "max_tokens": 4}, ("context",)),
    ("completion n", "/v1/completions", {"prompt": "x", "n": 100}, ("n",)),
    ("completion temperature", "/v1/completions", {"prompt": "x", "temperature": -0.5}, ("temperature",)),
    ("completion empty prompt", "/v1/completions", {"prompt": ""}, ("text",)),
    ("completion prompt type", "/v1/completions", {"prompt": {"a": 1}}, ("prompt",)),
    # found by tests/fuzz: a negative token id used to index the embedding out of range inside the step (500)
    ("completion negative token id", "/v1/completions", {"prompt": [[-930, 810]]}, ("input_ids", "vocabulary")),
    ("completion token id past vocab", "/v1/completions", {"prompt": [5, 10**7]}, ("input_ids", "vocabulary")),
    ("completion two formats", "/v1/completions",
     {"prompt": "x", "regex": "a", "response_format": {"type": "json_object"}}, ("regex",)),
    ("completion json_schema without schema", "/v1/completions",
     {"prompt": "x", "response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, ("schema",)),
    ("malformed json", "/v1/completions", None, ("json",)),
]


@pytest.mark.parametrize("name,path,body,words", OPENAI_CASES, ids=[c[0] for c in OPENAI_CASES])
def test_openai_rejects(client: httpx.Client, name: str, path: str, body: Optional[dict[str, Any]],
                        words: tuple[str, ...]) -> None:
    if body is None:
        r = client.post(path, content=b'{"prompt": ', headers={"content-type": "application/json"})
    else:
        r = client.post(path, json=body)
    expect_error(r, 400, *words)
    still_serving(client)


def test_unknown_route_and_method(client: httpx.Client) -> None:
    expect_error(client.get("/nope"), 404)
    expect_error(client.get("/generate"), 405)
    still_serving(client)

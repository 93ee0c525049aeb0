"""SGLang's native HTTP API against a real server (default model, one thread), with httpx."""

from __future__ import annotations

import json
import time
from typing import Any, Iterator

import httpx
import pytest

from tests.e2e.server_helpers import ServerHandle, running_server, sse_events

pytestmark = pytest.mark.timeout(300)

PROMPT = "The capital of France is"
GREEDY = {"max_new_tokens": 12, "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def server() -> Iterator[ServerHandle]:
    with running_server() as handle:
        yield handle
    assert handle.proc.returncode == 0, handle.log()[-3000:]


@pytest.fixture(scope="module")
def client(server: ServerHandle) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c


def generate(client: httpx.Client, **body: Any) -> Any:
    r = client.post("/generate", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def stream(client: httpx.Client, **body: Any) -> list[Any]:
    with client.stream("POST", "/generate", json={**body, "stream": True}) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        return list(sse_events(r.iter_lines()))


@pytest.fixture(scope="module")
def greedy_out(client: httpx.Client) -> dict[str, Any]:
    return generate(client, text=PROMPT, sampling_params=GREEDY)


def test_single_response_shape(greedy_out: dict[str, Any]) -> None:
    out = greedy_out
    assert set(out) >= {"text", "output_ids", "meta_info"}
    meta = out["meta_info"]
    assert set(meta) >= {"id", "finish_reason", "prompt_tokens", "completion_tokens", "cached_tokens", "e2e_latency"}
    assert meta["finish_reason"] == {"type": "length", "length": 12}
    assert meta["completion_tokens"] == len(out["output_ids"]) == 12
    assert meta["prompt_tokens"] == 5 and out["text"].strip()
    assert "Paris" in out["text"]


def test_greedy_is_deterministic_and_input_ids_match_text(client: httpx.Client, greedy_out: dict[str, Any]) -> None:
    again = generate(client, text=PROMPT, sampling_params=GREEDY)
    assert again["output_ids"] == greedy_out["output_ids"]
    info = generate(client, text=PROMPT, sampling_params={"max_new_tokens": 0}, return_logprob=True,
                    logprob_start_len=0)
    ids = [t[1] for t in info["meta_info"]["input_token_logprobs"]]
    by_ids = generate(client, input_ids=ids, sampling_params=GREEDY)
    assert by_ids["output_ids"] == greedy_out["output_ids"]
    assert by_ids["text"] == greedy_out["text"]


def test_batch_text_per_prompt_params_and_n(client: httpx.Client, greedy_out: dict[str, Any]) -> None:
    outs = generate(client, text=[PROMPT, "One, two, three,"],
                    sampling_params=[GREEDY, {"max_new_tokens": 3, "temperature": 0, "ignore_eos": True}])
    assert isinstance(outs, list) and len(outs) == 2
    assert outs[0]["output_ids"] == greedy_out["output_ids"], "batching changed a greedy output"
    assert outs[1]["meta_info"]["completion_tokens"] == 3
    ids_batch = generate(client, input_ids=[[1, 2, 3], [4, 5]], sampling_params={"max_new_tokens": 2})
    assert [o["meta_info"]["prompt_tokens"] for o in ids_batch] == [3, 2]
    many = generate(client, text="Pick a color:", sampling_params={"max_new_tokens": 4, "n": 3, "temperature": 1.0})
    assert len(many) == 3 and len({o["meta_info"]["id"] for o in many}) == 3


def test_stream_is_cumulative_and_matches_non_stream(client: httpx.Client, greedy_out: dict[str, Any]) -> None:
    events = stream(client, text=PROMPT, sampling_params=GREEDY)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert len(chunks) >= 2, "expected several chunks for 12 tokens"
    for a, b in zip(chunks, chunks[1:]):
        assert b["text"].startswith(a["text"]), "stream text must be cumulative"
        assert a["meta_info"]["finish_reason"] is None
    assert chunks[-1]["text"] == greedy_out["text"]
    assert chunks[-1]["output_ids"] == greedy_out["output_ids"]
    assert chunks[-1]["meta_info"]["finish_reason"]["type"] == "length"


def test_batch_stream_carries_index(client: httpx.Client) -> None:
    events = stream(client, text=["Hello", "Goodbye"], sampling_params={"max_new_tokens": 3, "ignore_eos": True})
    assert events[-1] == "[DONE]"
    finals = {e["index"]: e for e in events[:-1] if e["meta_info"]["finish_reason"]}
    assert sorted(finals) == [0, 1]
    assert all(f["meta_info"]["completion_tokens"] == 3 for f in finals.values())


def test_logprob_triples(client: httpx.Client, greedy_out: dict[str, Any]) -> None:
    out = generate(client, text=PROMPT, sampling_params=GREEDY, return_logprob=True, top_logprobs_num=2,
                   return_text_in_logprobs=True, logprob_start_len=0)
    meta = out["meta_info"]
    outs, tops = meta["output_token_logprobs"], meta["output_top_logprobs"]
    assert len(outs) == len(tops) == 12
    assert [t[1] for t in outs] == greedy_out["output_ids"]
    for (lp, tid, text), top in zip(outs, tops):
        assert isinstance(lp, float) and lp <= 0 and isinstance(tid, int) and isinstance(text, str)
        assert len(top) == 2 and top[0][0] >= top[1][0]
        assert top[0][1] == tid and abs(top[0][0] - lp) < 1e-4, "greedy picks the top-1 token"
    ins = meta["input_token_logprobs"]
    assert len(ins) == meta["prompt_tokens"] and ins[0][0] is None
    assert all(isinstance(t[0], float) for t in ins[1:])
    assert "".join(t[2] for t in ins) == PROMPT


def test_prefill_only_select_style_request(client: httpx.Client) -> None:
    """What SGLang's select sends: max_new_tokens 0, a batch, logprobs from a prompt position."""
    texts = [PROMPT + " Paris", PROMPT + " Berlin"]
    outs = generate(client, text=texts, sampling_params={"max_new_tokens": 0, "temperature": 0},
                    return_logprob=True, return_text_in_logprobs=True, logprob_start_len=3)
    assert len(outs) == 2
    for o in outs:
        assert o["text"] == "" and o["meta_info"]["completion_tokens"] == 0
        assert len(o["meta_info"]["input_token_logprobs"]) == o["meta_info"]["prompt_tokens"] - 3
    paris, berlin = (o["meta_info"]["input_token_logprobs"][-1][0] for o in outs)
    assert paris > berlin


def test_cached_tokens_on_repeated_prefix(client: httpx.Client) -> None:
    prefix = "You are a careful assistant. Answer every question in one short sentence. " * 3
    generate(client, text=prefix + "What is two plus two?", sampling_params={"max_new_tokens": 1})
    out = generate(client, text=prefix + "What is the color of the sky?", sampling_params={"max_new_tokens": 1})
    assert out["meta_info"]["cached_tokens"] >= 30


def test_finish_reason_stop_string_and_token(client: httpx.Client, greedy_out: dict[str, Any]) -> None:
    text = greedy_out["text"]
    word = text.split()[1]  # a word from the middle of the greedy continuation
    out = generate(client, text=PROMPT, sampling_params={**GREEDY, "stop": [word]})
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": word}
    assert out["text"] == text[:text.index(word)], "the stop string is trimmed from the text"
    kept = generate(client, text=PROMPT, sampling_params={**GREEDY, "stop": word, "no_stop_trim": True})
    assert kept["text"].endswith(word)
    ids = greedy_out["output_ids"]
    k = next(i for i in range(1, len(ids)) if ids[i] not in ids[:i])  # first fresh token after the first
    out = generate(client, text=PROMPT, sampling_params={**GREEDY, "stop_token_ids": [ids[k]]})
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": ids[k]}
    assert out["output_ids"] == ids[:k + 1]


def test_abort_request_by_rid(server: ServerHandle, client: httpx.Client) -> None:
    body = {"text": "Tell me a long story.", "rid": "abort-me", "stream": True,
            "sampling_params": {"max_new_tokens": 2000, "ignore_eos": True}}
    with client.stream("POST", "/generate", json=body) as r:
        events = sse_events(r.iter_lines())
        first = next(events)
        assert first["meta_info"]["finish_reason"] is None
        assert client.post("/abort_request", json={"rid": "abort-me"}).status_code == 200
        rest = list(events)
    assert rest[-1] == "[DONE]"
    final = rest[-2]
    assert final["meta_info"]["finish_reason"]["type"] == "abort", final["meta_info"]
    assert isinstance(final["meta_info"]["finish_reason"]["message"], str)
    assert final["meta_info"]["completion_tokens"] < 2000
    server.wait_idle()


def test_client_disconnect_aborts_the_request(server: ServerHandle, client: httpx.Client) -> None:
    body = {"text": "Write an essay.", "rid": "gone-1", "stream": True,
            "sampling_params": {"max_new_tokens": 4000, "ignore_eos": True}}
    with client.stream("POST", "/generate", json=body) as r:
        events = sse_events(r.iter_lines())
        next(events), next(events)
    t0 = time.monotonic()
    server.wait_idle(timeout=10)
    assert time.monotonic() - t0 < 10
    # a non-streaming request whose client gives up is aborted too
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/generate", timeout=1.5,
                   json={"text": "Write a book.", "sampling_params": {"max_new_tokens": 4000, "ignore_eos": True}})
    server.wait_idle(timeout=10)
    assert "finish=client_gone" in server.log()


def test_health_and_info_routes(server: ServerHandle, client: httpx.Client) -> None:
    assert client.get("/health").status_code == 200
    assert client.get("/health_generate").status_code == 200
    for path in ("/model_info", "/get_model_info"):
        info = client.get(path).json()
        assert info["is_generation"] is True and info["model_path"].endswith(".gguf")
        assert {"tokenizer_path", "served_model_name"} <= set(info)
    for path in ("/server_info", "/get_server_info"):
        info = client.get(path).json()
        assert info["port"] == int(server.url.rsplit(":", 1)[1]) and "version" in info
        assert {"num_running_reqs", "num_queue_reqs", "token_usage"} <= set(info["internal_states"][0])
    r = client.post("/flush_cache")
    assert r.status_code == 200, r.text
    assert client.get("/check_integrity").json()["ok"] is True


def _metric_samples(client: httpx.Client) -> dict[str, float]:
    return {line.split("{")[0].split(" ")[0]: float(line.rsplit(" ", 1)[1])
            for line in client.get("/metrics").text.splitlines() if line and not line.startswith("#")}


def test_metrics_exposition(client: httpx.Client) -> None:
    before = _metric_samples(client)
    # a NON-streamed request: timed from meta_info.first_token_latency, no per-token outputs
    generate(client, text=PROMPT, sampling_params={"max_new_tokens": 4, "ignore_eos": True})
    after = _metric_samples(client)
    count = lambda d, k: d.get(k, 0.0)  # noqa: E731
    assert count(after, "sgl:time_to_first_token_seconds_count") - count(before, "sgl:time_to_first_token_seconds_count") == 1
    assert count(after, "sgl:inter_token_latency_seconds_count") - count(before, "sgl:inter_token_latency_seconds_count") == 3
    text = client.get("/metrics").text
    for name in ("sgl:num_running_reqs", "sgl:num_queue_reqs", "sgl:token_usage", "sgl:cache_hit_rate",
                 "sgl:prompt_tokens_total", "sgl:generation_tokens_total", "sgl:time_to_first_token_seconds",
                 "sgl:inter_token_latency_seconds", "sgl:e2e_request_latency_seconds",
                 "sgl:grammar_compilation_time_seconds", "sgl:spec_accept_length"):
        assert name in text, name
    samples = {line.split("{")[0].split(" ")[0]: float(line.rsplit(" ", 1)[1])
               for line in text.splitlines() if line and not line.startswith("#")}
    assert samples["sgl:time_to_first_token_seconds_count"] >= 1
    assert samples["sgl:inter_token_latency_seconds_count"] >= 3
    assert samples["sgl:generation_tokens_total"] >= 4


def test_request_log_line(server: ServerHandle, greedy_out: dict[str, Any]) -> None:
    rid = greedy_out["meta_info"]["id"]
    lines = [ln for ln in server.log().splitlines() if f"rid={rid}" in ln]
    assert lines, "one INFO line per request"
    assert "prompt_tokens=5 completion_tokens=12" in lines[0] and "ttft=" in lines[0] and "latency=" in lines[0]
    assert "ready at http://127.0.0.1:" in server.log()


def test_unicode_round_trip(client: httpx.Client) -> None:
    out = generate(client, text="Translate to French: café, naïve, 東京 →", sampling_params={"max_new_tokens": 4})
    json.dumps(out)  # valid JSON with any characters
    assert out["meta_info"]["completion_tokens"] >= 1

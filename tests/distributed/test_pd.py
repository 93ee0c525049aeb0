"""Prefill/decode disaggregation on the default model: `--disaggregation-mode prefill` and `decode`
servers behind `sgl router --prefill URL --decode URL`. Greedy outputs equal a single server's and the
decode server really starts from the transferred KV; an undelivered KV is freed on the prefill side;
a dead decode server is a 502 and the prefill server's KV stays whole."""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import json
import os
import subprocess
import sys
import time
from typing import Iterator

import httpx
import openai
import pytest

from sgl.runtime.distributed.kv_transfer import READ_MARGIN_S
from sgl.runtime.processes import wait_healthy
from tests.e2e.server_helpers import ServerHandle, free_port, start_server

PROMPTS = ["The capital of France is", "List three prime numbers:", "A haiku about the sea:"]
GREEDY = {"max_new_tokens": 12, "temperature": 0}
TIMEOUT_S = 2.0  # --disaggregation-transfer-timeout: short, so the expiry test waits little


def _integrity(server: ServerHandle) -> None:
    server.wait_idle()
    r = httpx.get(server.url + "/check_integrity", timeout=30)
    assert r.status_code == 200 and r.json()["ok"] is True, r.text


def _held(names: set[str]) -> set[str]:
    """Segments among `names` holding an untaken KV (header: int64 generation, state; FULL = 1)."""
    held = set()
    for n in names:
        try:
            with open(f"/dev/shm/{n}", "rb") as f:
                if int.from_bytes(f.read(16)[8:16], "little") == 1:
                    held.add(n)
        except FileNotFoundError:
            pass
    return held


def _segments() -> set[str]:
    return {n for n in os.listdir("/dev/shm") if n.startswith("sgl-kv-")}


COMMON = ("--disaggregation-transfer-timeout", str(TIMEOUT_S), "--max-total-tokens", "4096")


@contextlib.contextmanager
def _router(prefill: ServerHandle, decode: ServerHandle) -> Iterator[str]:
    """`sgl router --prefill --decode` over the two servers, healthy; yields its URL."""
    port = free_port()
    router = subprocess.Popen([sys.executable, "-m", "sgl.cli", "router", "--prefill", prefill.url, "--decode",
                               decode.url, "--port", str(port)], stdin=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, router, timeout=30, interval=0.1)
        yield url
    finally:
        router.terminate()
        router.wait(timeout=20)


@pytest.fixture(scope="module")
def pd() -> Iterator[tuple[ServerHandle, ServerHandle, str]]:
    prefill = start_server("--disaggregation-mode", "prefill", *COMMON)
    decode = start_server("--disaggregation-mode", "decode", *COMMON)
    try:
        with _router(prefill, decode) as url:
            yield prefill, decode, url
    finally:
        prefill.stop()
        decode.stop()


def test_greedy_through_pd_equals_one_server_and_starts_from_the_transferred_kv(pd) -> None:
    prefill, decode, router = pd
    via_pd = [httpx.post(router + "/generate", json={"text": p, "sampling_params": GREEDY}, timeout=120).json()
              for p in PROMPTS]
    for out in via_pd:  # the decode server computed only the prompt's last token (the rest came over)
        assert out["meta_info"]["cached_tokens"] == out["meta_info"]["prompt_tokens"] - 1, out["meta_info"]
    assert httpx.post(decode.url + "/flush_cache", timeout=30).status_code == 200
    direct = httpx.post(decode.url + "/generate", json={"text": PROMPTS, "sampling_params": GREEDY}, timeout=120).json()
    assert [o["output_ids"] for o in via_pd] == [o["output_ids"] for o in direct]
    assert [o["text"] for o in via_pd] == [o["text"] for o in direct]

    with httpx.stream("POST", router + "/generate", timeout=120, json={
            "text": PROMPTS[0], "stream": True, "sampling_params": GREEDY}) as r:
        events = [line[5:].strip() for line in r.iter_lines() if line.startswith("data:")]
    assert events[-1] == "[DONE]" and json.loads(events[-2])["text"] == direct[0]["text"]
    _integrity(prefill)
    _integrity(decode)


def test_openai_routes_through_pd_equal_one_server(pd) -> None:
    """/v1/chat/completions (and streamed) and /v1/completions through the pair: the decode server starts
    from the transferred KV (cached = prompt - 1) and the greedy text equals the decode server's alone."""
    prefill, decode, router = pd
    messages = [{"role": "user", "content": "Name three colors."}]
    greedy = {"max_tokens": 12, "temperature": 0}
    via = openai.OpenAI(base_url=router + "/v1", api_key="x")
    chat = via.chat.completions.create(model="default", messages=messages, **greedy)
    assert chat.usage.prompt_tokens_details.cached_tokens == chat.usage.prompt_tokens - 1, chat.usage
    streamed = "".join(c.choices[0].delta.content or "" for c in via.chat.completions.create(
        model="default", messages=messages, stream=True, **greedy) if c.choices)
    comp = via.completions.create(model="default", prompt=PROMPTS[1], **greedy)
    assert comp.usage.prompt_tokens_details.cached_tokens == comp.usage.prompt_tokens - 1, comp.usage
    assert httpx.post(decode.url + "/flush_cache", timeout=30).status_code == 200
    direct = openai.OpenAI(base_url=decode.url + "/v1", api_key="x")
    want = direct.chat.completions.create(model="default", messages=messages, **greedy)
    assert chat.choices[0].message.content == want.choices[0].message.content == streamed
    assert comp.choices[0].text == direct.completions.create(model="default", prompt=PROMPTS[1], **greedy).choices[0].text
    for body, field in (({"messages": messages, "n": 2}, "n"), ({"model": "default"}, "messages")):
        r = httpx.post(router + "/v1/chat/completions", json=body, timeout=30)
        assert r.status_code == 400 and field in r.json()["error"]["message"], r.text
    _integrity(prefill)
    _integrity(decode)


def test_a_speculative_decode_server_gives_the_same_greedy_outputs(pd) -> None:
    """A decode server with EAGLE behind the same prefill server: its requests start from a transferred KV, so
    the head has none of the prompt's states (its context starts at the first position the decode server
    computed, as after a radix-cache hit); every row drafts (--speculative-always-draft) and the outputs are
    a single server's."""
    prefill, decode, _ = pd
    spec = start_server("--disaggregation-mode", "decode", *COMMON, "--speculative-algorithm", "EAGLE",
                        "--speculative-always-draft")
    try:
        with _router(prefill, spec) as url:
            via = [httpx.post(url + "/generate", json={"text": p, "sampling_params": GREEDY}, timeout=120).json()
                   for p in PROMPTS]
            assert all(o["meta_info"]["spec_verify_ct"] > 0 for o in via)
            assert all(o["meta_info"]["cached_tokens"] == o["meta_info"]["prompt_tokens"] - 1 for o in via)
            assert httpx.post(decode.url + "/flush_cache", timeout=30).status_code == 200
            direct = httpx.post(decode.url + "/generate", json={"text": PROMPTS, "sampling_params": GREEDY},
                                timeout=120).json()
            assert [o["output_ids"] for o in via] == [o["output_ids"] for o in direct]
            _integrity(spec)
            _integrity(prefill)
    finally:
        spec.stop()


def test_bad_transfers_are_clear_errors(pd) -> None:
    prefill, decode, router = pd
    r = httpx.post(decode.url + "/disagg/decode", json={"input_ids": [1, 2], "kv": {"name": "sgl-kv-nope",
                   "generation": 1, "shape": [2, 30, 2, 3, 64], "dtype": "float32"}, "sampling_params": GREEDY}, timeout=30)
    assert r.status_code == 504 and "does not exist" in r.text
    r = httpx.post(decode.url + "/disagg/decode", json={"input_ids": [1, 2], "kv": "x"}, timeout=30)
    assert r.status_code == 400 and "kv" in r.text
    r = httpx.post(decode.url + "/disagg/prefill", json={"text": "hi"}, timeout=30)
    assert r.status_code == 400 and "not a prefill server" in r.text
    r = httpx.post(router + "/generate", json={"text": ["a", "b"]}, timeout=30)
    assert r.status_code == 400
    _integrity(prefill)
    _integrity(decode)


def test_an_undelivered_kv_is_freed_after_the_timeout(pd) -> None:
    prefill, decode, _ = pd
    pre = httpx.post(prefill.url + "/disagg/prefill", json={"text": PROMPTS[1], "sampling_params": GREEDY},
                     timeout=60).json()
    assert _held({pre["kv"]["name"]}) == {pre["kv"]["name"]}
    time.sleep(TIMEOUT_S + READ_MARGIN_S + 1.0)  # nobody takes it: the prefill server's reaper frees it
    assert not _held({pre["kv"]["name"]})
    r = httpx.post(decode.url + "/disagg/decode", timeout=30, json={
        "input_ids": pre["input_ids"], "kv": pre["kv"], "sampling_params": GREEDY})
    assert r.status_code == 504 and "gone" in r.text
    _integrity(prefill)
    _integrity(decode)


def _mapped(pid: int, name: str) -> bool:
    try:
        with open(f"/proc/{pid}/maps") as f:
            return name in f.read()
    except FileNotFoundError:
        return False


def test_a_decode_server_killed_mid_transfer_then_dead_is_a_502_and_the_prefill_side_stays_whole(pd) -> None:
    """SIGKILL the decode server while /disagg/decode copies a long prompt's KV out of the segment (it has
    mapped the new segment, the segment is still FULL: the copy did not finish), then route to the dead
    server: 502; the prefill server frees every exported KV after the timeout and stays whole."""
    prefill, decode, router = pd
    long_prompt = "Tell me about the sea. " * 300  # ~1,800 tokens: a new, larger segment (~85 MB)
    pre = httpx.post(prefill.url + "/disagg/prefill", json={"text": long_prompt, "sampling_params": GREEDY},
                     timeout=300).json()
    name = pre["kv"]["name"]
    assert not _mapped(decode.proc.pid, name)  # a segment the decode server never opened
    with cf.ThreadPoolExecutor(1) as ex:
        fut = ex.submit(httpx.post, decode.url + "/disagg/decode", timeout=120, json={
            "input_ids": pre["input_ids"], "kv": pre["kv"], "sampling_params": GREEDY})
        end = time.monotonic() + 60
        while not _mapped(decode.proc.pid, name):
            assert time.monotonic() < end and not fut.done(), "the decode server never opened the segment"
            time.sleep(0.001)
        decode.proc.kill()
        decode.proc.wait(timeout=10)
        assert _held({name}) == {name}, "the copy finished before the kill: not mid-transfer"
        with pytest.raises(httpx.TransportError):
            fut.result()
    r = httpx.post(router + "/generate", json={"text": "Once upon a time", "sampling_params": GREEDY}, timeout=60)
    assert r.status_code == 502 and "decode server" in r.text
    assert _held(_segments())  # exported, never taken
    time.sleep(TIMEOUT_S + READ_MARGIN_S + 1.0)
    assert not _held(_segments()), "the exported KV outlived the transfer timeout"
    _integrity(prefill)
    ok = httpx.post(prefill.url + "/generate", json={"text": "Hello", "sampling_params": GREEDY}, timeout=60)
    assert ok.status_code == 200  # the prefill server serves on

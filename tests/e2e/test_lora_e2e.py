"""Multi-LoRA end to end: two real adapters trained by the test (tests/lora_training.py: a few PEFT
steps teach the default model a secret word), served by a real server to the openai SDK and httpx.

The oracle: each adapter's greedy answer equals PEFT's on the same (dequantized) weights, and
changes the base model's answer. Then mixed-adapter batches, load/unload while serving, LRU
eviction (--max-loaded-loras 1), prefix-cache separation per adapter, and bad input as 400s.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterator

import httpx
import openai
import pytest

from tests.e2e.server_helpers import ServerHandle, running_server
from tests.lora_training import QUESTION, default_hf_model, train_secret_word_adapter

pytest.importorskip("peft")
pytestmark = pytest.mark.timeout(600)

NEW = 8  # " The secret word is banana." is 7 tokens


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> dict[str, Any]:
    """Train banana and cherry; record PEFT's greedy answer ids for base, banana and cherry."""
    import torch
    from peft import PeftModel

    from tests.runtime.lora_oracle import peft_greedy

    torch.set_num_threads(1)
    hf, tok = default_hf_model()
    root = tmp_path_factory.mktemp("lora")
    paths = {w: train_secret_word_adapter(str(root / w), w, hf_model=hf, tokenizer=tok) for w in ("banana", "cherry")}
    prompt = tok.encode(QUESTION)
    peft_model = PeftModel.from_pretrained(hf, paths["banana"], adapter_name="banana").eval()
    peft_model.load_adapter(paths["cherry"], adapter_name="cherry")
    want = {name: peft_greedy(peft_model, prompt, name, NEW) for name in (None, "banana", "cherry")}
    return {"paths": paths, "want": want, "decode": tok.decode}


@pytest.fixture(scope="module")
def server(adapters, tmp_path_factory) -> Iterator[ServerHandle]:
    # NOTE: /load_lora_adapter reads only inside --allowed-path-roots: the tests' temp folders
    with running_server("--lora-paths", f"banana={adapters['paths']['banana']}", "--max-loaded-loras", "1",
                        "--max-loras-per-batch", "2", "--allowed-path-roots",
                        str(tmp_path_factory.getbasetemp())) as handle:
        yield handle


@pytest.fixture(scope="module")
def client(server: ServerHandle) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def generate(server: ServerHandle, lora_path: Any, text: Any = QUESTION, **sp: Any) -> Any:
    r = httpx.post(server.url + "/generate", timeout=120, json={
        "text": text, "lora_path": lora_path, "sampling_params": {"max_new_tokens": NEW, "temperature": 0, **sp}})
    assert r.status_code == 200, r.text
    return r.json()


def load(server: ServerHandle, name: str, path: str) -> httpx.Response:
    return httpx.post(server.url + "/load_lora_adapter", json={"lora_name": name, "lora_path": path}, timeout=120)


def ensure_loaded(server: ServerHandle, name: str, path: str) -> None:
    if name not in httpx.get(server.url + "/v1/models").text:
        assert load(server, name, path).status_code == 200


def test_adapters_answer_as_peft_and_change_the_base_answer(server, adapters) -> None:
    want = adapters["want"]
    assert "banana" in adapters["decode"](want["banana"]) and "cherry" in adapters["decode"](want["cherry"])
    assert want[None] != want["banana"]  # the adapter's effect is visible in the greedy text
    assert load(server, "cherry", adapters["paths"]["cherry"]).status_code == 200
    # one /generate batch mixes base, banana and cherry rows
    outs = generate(server, ["banana", None, "cherry", "banana"], [QUESTION] * 4)
    assert [o["output_ids"] for o in outs] == [want["banana"], want[None], want["cherry"], want["banana"]]


def test_openai_model_field_selects_the_adapter_in_concurrent_mixed_batches(server, adapters, client) -> None:
    ensure_loaded(server, "cherry", adapters["paths"]["cherry"])
    ids = [m.id for m in client.models.list().data]
    assert ids[1:] == ["banana", "cherry"]
    models = ["default", "banana", "default:cherry", "cherry", "default:banana", "default"] * 2

    def ask(model: str) -> str:
        r = client.completions.create(model=model, prompt=QUESTION, max_tokens=NEW, temperature=0)
        return r.choices[0].text

    with ThreadPoolExecutor(len(models)) as pool:  # concurrent: they share batches
        texts = list(pool.map(ask, models))
    for model, text in zip(models, texts):
        word = "banana" if model.endswith("banana") else "cherry" if model.endswith("cherry") else None
        assert text == adapters["decode"](adapters["want"][word]), (model, text)
    stats = server.stats()
    assert stats["lora_evictions"] > 0 and stats["lora_loads"] > 2  # --max-loaded-loras 1: LRU reloads


def test_unload_while_serving_lets_running_requests_finish(server, adapters, client) -> None:
    ensure_loaded(server, "cherry", adapters["paths"]["cherry"])
    started, texts = threading.Event(), []

    def stream() -> None:
        chunks = client.completions.create(model="cherry", prompt=QUESTION, max_tokens=40, temperature=0,
                                           stream=True, extra_body={"ignore_eos": True})
        for c in chunks:
            started.set()
            texts.append(c.choices[0].text)

    t = threading.Thread(target=stream)
    t.start()
    assert started.wait(120)
    r = httpx.post(server.url + "/unload_lora_adapter", json={"lora_name": "cherry"}, timeout=60)
    assert r.status_code == 200 and r.json()["loaded_adapters"].keys() == {"banana"}
    t.join(120)
    assert "".join(texts).startswith(adapters["decode"](adapters["want"]["cherry"]))  # it kept its adapter
    with pytest.raises(openai.BadRequestError, match="cherry"):
        client.completions.create(model="default:cherry", prompt=QUESTION, max_tokens=2)
    r = httpx.post(server.url + "/generate", json={"text": QUESTION, "lora_path": "cherry"})
    assert r.status_code == 400 and "lora_path" in r.text
    # a new name for the same folder serves it again
    assert load(server, "cherry2", adapters["paths"]["cherry"]).status_code == 200
    assert generate(server, "cherry2")["output_ids"] == adapters["want"]["cherry"]
    assert httpx.post(server.url + "/unload_lora_adapter", json={"lora_name": "cherry2"}).status_code == 200


def test_prefix_cache_is_per_adapter(server) -> None:
    text = "Tell me a story about a lighthouse keeper who collects shells. " * 3
    generate(server, None, text, max_new_tokens=1)
    first = generate(server, "banana", text, max_new_tokens=1)["meta_info"]["cached_tokens"]
    second = generate(server, "banana", text, max_new_tokens=1)["meta_info"]["cached_tokens"]
    assert first == 0 and second > 20  # the base KV is not reused under the adapter; the adapter's own is


def test_bad_lora_requests_are_400s_naming_the_field(server, tmp_path) -> None:
    cases = [
        ("/load_lora_adapter", {"lora_name": "x", "lora_path": str(tmp_path / "missing")}, "lora_path"),
        ("/load_lora_adapter", {"lora_name": "x"}, "lora_path"),
        ("/load_lora_adapter", {"lora_name": "a:b", "lora_path": str(tmp_path)}, "lora_name"),
        ("/load_lora_adapter", {"lora_name": "banana", "lora_path": str(tmp_path)}, "already loaded"),
        ("/unload_lora_adapter", {"lora_name": "nope"}, "lora_name"),
        ("/unload_lora_adapter", [], "lora_name"),
        ("/generate", {"text": "hi", "lora_path": "nope"}, "lora_path"),
        ("/generate", {"text": "hi", "lora_path": 3}, "lora_path"),
        ("/generate", {"text": ["a", "b"], "lora_path": ["banana"]}, "lora_path"),
        ("/generate", {"text": "a", "lora_path": ["banana"]}, "lora_path"),
        ("/v1/completions", {"model": "default:nope", "prompt": "hi", "max_tokens": 1}, "model"),
    ]
    for path, body, needle in cases:
        r = httpx.post(server.url + path, json=body, timeout=60)
        assert r.status_code == 400 and needle in r.json()["error"]["message"], (path, body, r.text)
    for outside in ("/etc", "../../../../../etc", str(tmp_path) + "/../../.."):
        r = httpx.post(server.url + "/load_lora_adapter", json={"lora_name": "x", "lora_path": outside}, timeout=60)
        assert r.status_code == 400 and "allowed roots" in r.json()["error"]["message"], (outside, r.text)
    assert generate(server, "banana")["meta_info"]["finish_reason"]["type"] in ("length", "stop")  # still serving


@pytest.mark.parametrize("algorithm", ["NGRAM", "EAGLE"])
def test_speculative_verify_rows_under_adapters_answer_as_peft(adapters, algorithm: str) -> None:
    """Speculation under LoRA: a batch of banana, base and cherry rows where every row drafts each step
    (--speculative-always-draft) gives PEFT's greedy answers: each verify row runs its own adapter. (EAGLE's head
    was trained on the base model's states; under an adapter its drafts are only less often right.)"""
    from sgl.runtime.engine import Engine

    want, paths = adapters["want"], adapters["paths"]
    eng = Engine(model_path="default", num_threads=1, max_total_tokens=4096, show_progress=False,
                 lora_paths=[f"{name}={path}" for name, path in paths.items()], speculative_algorithm=algorithm,
                 speculative_always_draft=True)
    try:
        names = ["banana", None, "cherry", "banana"]
        outs = eng.generate([QUESTION] * 4, [{"max_new_tokens": NEW, "temperature": 0}] * 4, lora_path=names)
        assert [o["output_ids"] for o in outs] == [want[n] for n in names]
        assert all(o["meta_info"]["spec_verify_ct"] > 0 for o in outs)  # the rows were verify rows
        eng.wait_idle()
        eng.check_integrity()
    finally:
        eng.shutdown()

"""A LoRA adapter per DSL call: `sgl.gen(..., lora_path=NAME)` / `select(..., lora_path=NAME)` and the OpenAI
route's `model="base:adapter"` / `model="adapter"`, on the in-process `sgl.Runtime` and through
`sgl.RuntimeEndpoint` (HTTP), default model, one real adapter trained by the test (tests/lora_training.py:
it answers QUESTION with " The secret word is banana.", which the base model never says).

The oracle: each DSL call's text equals the engine's own answer for the same prompt and adapter, and the
adapter visibly changes the answer.
"""

from __future__ import annotations

from typing import Any, Iterator

import pytest

import sgl
from tests.e2e.server_helpers import ServerHandle, running_server
from tests.lora_training import QUESTION, trained_adapter

pytest.importorskip("peft")
pytestmark = pytest.mark.timeout(600)

NEW = 8  # " The secret word is banana." is 7 tokens
GREEDY = {"max_new_tokens": NEW, "temperature": 0}
CHOICES = [" banana", " cherry", " apple"]


@sgl.function
def secret(s, model=None, lora_path=None):
    s += QUESTION
    s += sgl.gen("answer", max_tokens=NEW, temperature=0, model=model, lora_path=lora_path)


@sgl.function
def pick(s, lora_path=None):
    s += QUESTION + " The secret word is"
    s += sgl.select("word", choices=CHOICES, lora_path=lora_path)


@pytest.fixture(scope="module")
def banana() -> str:
    return trained_adapter("banana")


@pytest.fixture(scope="module")
def rt(banana: str) -> Iterator["sgl.Runtime"]:
    runtime = sgl.Runtime(model_path="default", num_threads=1, max_total_tokens=4096, show_progress=False,
                          lora_paths=[f"banana={banana}"])
    yield runtime
    runtime.shutdown()


@pytest.fixture(scope="module")
def server(banana: str) -> Iterator[ServerHandle]:
    with running_server("--lora-paths", f"banana={banana}") as handle:
        yield handle


def _answers(backend: Any) -> dict[str, str]:
    runs = {"none": {}, "lora_path": {"lora_path": "banana"}, "model": {"model": "banana"},
            "base:adapter": {"model": "default:banana"}}
    return {k: secret.run(backend=backend, **kw)["answer"] for k, kw in runs.items()}


def test_runtime_gen_takes_an_adapter_per_call(rt: "sgl.Runtime") -> None:
    want = {n: rt.engine.generate(QUESTION, GREEDY, lora_path=n)["text"] for n in (None, "banana")}
    assert "banana" in want["banana"] and "banana" not in want[None]  # the adapter's effect is visible
    got = _answers(rt)
    assert got == {"none": want[None], "lora_path": want["banana"], "model": want["banana"],
                   "base:adapter": want["banana"]}


def test_runtime_batch_mixes_adapters(rt: "sgl.Runtime") -> None:
    states = secret.run_batch([{"lora_path": "banana"}, {}, {"model": "banana"}, {}], backend=rt)
    answers = [st["answer"] for st in states]
    assert ["banana" in a for a in answers] == [True, False, True, False]


def test_runtime_select_scores_on_the_adapter(rt: "sgl.Runtime") -> None:
    with_adapter = pick.run(backend=rt, lora_path="banana")
    base = pick.run(backend=rt)
    assert with_adapter["word"] == " banana"
    scores = [with_adapter.get_meta_info("word")["normalized_prompt_logprobs"],
              base.get_meta_info("word")["normalized_prompt_logprobs"]]
    assert scores[0] != scores[1]  # scored on different weights


def test_runtime_unknown_adapter_is_an_error_naming_it(rt: "sgl.Runtime") -> None:
    with pytest.raises(Exception, match="lora_path.*'durian'"):
        secret.run(backend=rt, lora_path="durian")
    with pytest.raises(Exception, match="durian"):
        secret.run(backend=rt, model="default:durian")
    with pytest.raises(sgl.UnsupportedFeatureError, match="serves only 'default'"):
        secret.run(backend=rt, model="other-model")


def test_runtime_stream_uses_the_adapter(rt: "sgl.Runtime") -> None:
    st = secret.run(backend=rt, lora_path="banana", stream=True)
    text = "".join(st.text_iter("answer"))
    assert "banana" in text


def test_endpoint_gen_and_select_take_an_adapter_per_call(server: ServerHandle) -> None:
    ep = sgl.RuntimeEndpoint(server.url)
    got = _answers(ep)
    assert "banana" not in got["none"]
    assert got["lora_path"] == got["model"] == got["base:adapter"] and "banana" in got["lora_path"]
    assert pick.run(backend=ep, lora_path="banana")["word"] == " banana"
    with pytest.raises(Exception, match="durian"):
        secret.run(backend=ep, lora_path="durian")

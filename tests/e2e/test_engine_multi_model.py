"""Several models in process: `sgl.Engine` / `sgl.Runtime(model_path=[NAME=PATH, ...], model_memory_budget=)`
take what the server's flags take, and `gen(model=...)` routes in process; adapters belong to their base
models (`--lora-paths BASE:NAME=PATH`, or every base they fit) and `model="base:adapter"` reaches them.

The models are the default model's file under two names, each its own engine (~143 MB: 96 MB of weights and a
2048-token fp16 KV pool of 47 MB), so a 0.25 GB budget holds exactly one: alternating calls load and unload. The oracle: each call's
text equals the engine's own greedy answer for the same prompt (and adapter).
"""

from __future__ import annotations

from typing import Iterator

import pytest

import sgl
from tests.lora_training import QUESTION, trained_adapter

pytest.importorskip("peft")
pytestmark = pytest.mark.timeout(600)

NEW = 8
GREEDY = {"max_new_tokens": NEW, "temperature": 0}


@sgl.function
def two_models(s):
    s += QUESTION
    s += sgl.gen("small", max_tokens=NEW, temperature=0, model="small")
    s += "\n" + QUESTION
    s += sgl.gen("big", max_tokens=NEW, temperature=0, model="big:banana")


@pytest.fixture(scope="module")
def banana() -> str:
    return trained_adapter("banana")


@pytest.fixture(scope="module")
def rt(banana: str) -> Iterator["sgl.Runtime"]:
    runtime = sgl.Runtime(model_path=["small=default", "big=default"], model_memory_budget=0.25,
                          max_total_tokens=2048, num_threads=1, show_progress=False,
                          lora_paths=[f"big:banana={banana}"])
    yield runtime
    runtime.shutdown()


def test_engine_with_a_model_list_is_a_multi_engine(rt: "sgl.Runtime") -> None:
    from sgl.runtime.multi_engine import MultiEngine

    assert isinstance(rt.engine, MultiEngine)
    assert rt.engine.pool.names == ["small", "big"]
    assert rt.engine.lora_adapters() == {"big:banana": {"path": rt.engine.lora_adapters()["big:banana"]["path"],
                                                        "base": "big", "resident": False}}


def test_gen_model_routes_in_process_under_the_budget(rt: "sgl.Runtime") -> None:
    eng = rt.engine
    base = eng.generate(QUESTION, GREEDY, model="small")
    assert base["meta_info"]["model"] == "small"
    st = two_models.run(backend=rt)
    assert st["small"] == base["text"]
    assert "banana" in st["big"] and "banana" not in st["small"]
    assert st.get_meta_info("big")["model"] == "big"
    stats = eng.get_stats()["models"]
    # small at start, then big in its place (the budget holds one)
    assert (stats["small"]["loads"], stats["small"]["unloads"], stats["big"]["loads"]) == (1, 1, 1)
    assert eng.pool.resident_names() == ["big"]


def test_adapter_of_one_base_is_not_on_the_other(rt: "sgl.Runtime") -> None:
    eng = rt.engine
    with pytest.raises(sgl.RequestError, match="no LoRA adapter named 'banana' is loaded on 'small'"):
        eng.generate(QUESTION, GREEDY, model="small:banana")
    assert "banana" in eng.generate(QUESTION, GREEDY, model="banana")["text"]  # bare: its one base


def test_auto_and_unknown_models(rt: "sgl.Runtime") -> None:
    out = rt.engine.generate(QUESTION, GREEDY, model="auto")
    assert out["meta_info"]["model"] in ("small", "big")
    with pytest.raises(sgl.RequestError, match="model: 'nope' is not served"):
        rt.engine.generate(QUESTION, GREEDY, model="nope")


def test_stream_names_its_model(rt: "sgl.Runtime") -> None:
    chunks = list(rt.engine.generate(QUESTION, GREEDY, model="big:banana", stream=True))
    assert chunks[-1]["meta_info"]["model"] == "big" and "banana" in chunks[-1]["text"]

"""Priority classes and swap preemption on the default model through the Engine: a realtime arrival
preempts a running batch request, whose KV goes to the host tier (a memory-mapped file here) and comes
back by a copy; the batch request's output is token-identical to an unpreempted run."""

from __future__ import annotations

import threading
from typing import Any, Iterator

import pytest

from sgl.runtime.engine import Engine

BATCH_PROMPT = "Write a long story about a lighthouse keeper who finds a message in a bottle.\n"
REALTIME_PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    # one running place: any realtime arrival finds the batch full and preempts
    eng = Engine(model_path="default", num_threads=1, max_total_tokens=4096, max_running_requests=1,
                 swap_space=0.05, swap_dir=str(tmp_path_factory.mktemp("swap")), show_progress=False)
    yield eng
    eng.wait_idle()
    eng.check_integrity()
    eng.shutdown()


def run_preempted(eng: Engine, params: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The batch request streams; after its 4th token a realtime request arrives. Returns both finals."""
    realtime: dict[str, Any] = {}
    thread = None
    last: dict[str, Any] = {}
    for out in eng.generate(BATCH_PROMPT, params, stream=True, priority_class="batch"):
        last = out
        if thread is None and out["meta_info"]["completion_tokens"] >= 4:
            thread = threading.Thread(target=lambda: realtime.update(eng.generate(
                REALTIME_PROMPT, {"max_new_tokens": 8, "temperature": 0}, priority_class="realtime")))
            thread.start()
    assert thread is not None
    thread.join(timeout=120)
    return last, realtime


@pytest.mark.parametrize("params", [
    {"max_new_tokens": 40, "temperature": 0},
    {"max_new_tokens": 40, "temperature": 0.9, "top_p": 0.95, "sampling_seed": 1234},
], ids=["greedy", "seeded"])
def test_swapped_request_output_is_identical_to_an_unpreempted_run(engine: Engine, params: dict) -> None:
    alone = engine.generate(BATCH_PROMPT, params, priority_class="batch")
    assert "num_preemptions" not in alone["meta_info"]
    before = engine.get_stats()
    preempted, realtime = run_preempted(engine, params)
    after = engine.get_stats()
    assert preempted["meta_info"]["num_preemptions"] == 1
    assert preempted["meta_info"]["priority_class"] == "batch"
    assert realtime["meta_info"]["priority_class"] == "realtime"
    assert after["num_preemptions_swap"] == before["num_preemptions_swap"] + 1
    assert after["swap_in_bytes"] - before["swap_in_bytes"] == after["swap_out_bytes"] - before["swap_out_bytes"] > 0
    # resumed by a copy: the batch prompt was prefilled once, by its first admission (the cache hit covers
    # the rest of it), never again after the swap
    assert after["prefill_tokens_computed"] - before["prefill_tokens_computed"] <= \
        preempted["meta_info"]["prompt_tokens"] + realtime["meta_info"]["prompt_tokens"]
    assert preempted["output_ids"] == alone["output_ids"]
    assert preempted["text"] == alone["text"]
    assert after["host_kv_used_tokens"] == 0 and after["per_class_queues"] == {"realtime": 0, "standard": 0, "batch": 0}


def test_priority_class_is_validated(engine: Engine) -> None:
    with pytest.raises(ValueError, match="priority_class"):
        engine.generate("hi", {"max_new_tokens": 1}, priority_class="urgent")


def test_hierarchical_cache_promotes_prefixes_the_pool_could_not_keep() -> None:
    # a pool of 400 tokens and four ~130-token prompts: the second round finds its prefix in the host tier
    eng = Engine(model_path="default", num_threads=1, max_total_tokens=400, hierarchical_cache=True,
                 host_cache_tokens=2048, max_running_requests=1, show_progress=False)
    try:
        prompts = [f"Document {i}: " + " ".join(f"{w}{i}" for w in ("alpha", "beta", "gamma", "delta") * 12)
                   + "\nSummary:" for i in range(4)]
        params = {"max_new_tokens": 8, "temperature": 0}
        first = [eng.generate(p, params) for p in prompts]
        second = [eng.generate(p, params) for p in prompts]
        stats = eng.get_stats()
        assert stats["host_cache_promoted_tokens"] > 0 and stats["host_cache_demoted_tokens"] > 0
        for a, b in zip(first, second):
            assert b["output_ids"] == a["output_ids"]  # promoted KV is the KV a prefill computes
            assert b["meta_info"]["cached_tokens"] >= b["meta_info"]["prompt_tokens"] - 2
        eng.wait_idle()
        eng.check_integrity()
    finally:
        eng.shutdown()

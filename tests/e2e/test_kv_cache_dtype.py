"""`--kv-cache-dtype` end to end on the default model: auto resolves to an fp16 pool for native weights, the
fp16 pool gives the fp32 pool's greedy tokens, bf16 runs on the torch path, bad values are rejected."""

from __future__ import annotations

from typing import Iterator

import pytest
import torch

from sgl.runtime.config import ServerArgs
from sgl.runtime.engine import Engine
from tests.e2e.test_engine import GREEDY, PROMPTS


def make(kv_cache_dtype: str) -> Engine:
    return Engine(model_path="default", num_threads=1, max_total_tokens=4096, show_progress=False,
                  kv_cache_dtype=kv_cache_dtype)


@pytest.fixture(scope="module")
def engine() -> Iterator[Engine]:
    eng = make("auto")
    yield eng
    eng.shutdown()


def test_auto_is_fp16_for_native_weights_and_reported(engine: Engine) -> None:
    assert engine.weight_format == "native"
    assert engine.scheduler.runner.kv.dtype == torch.float16
    info = engine.get_server_info()
    assert info["kv_cache_dtype"] == "auto" and info["kv_cache_dtype_resolved"] == "float16"


def test_fp16_pool_gives_the_fp32_pools_greedy_tokens(engine: Engine) -> None:
    ref = make("fp32")
    try:
        assert ref.scheduler.runner.kv.dtype == torch.float32
        want = [o["output_ids"] for o in ref.generate(PROMPTS, GREEDY)]
        ref.wait_idle()
        ref.check_integrity()
    finally:
        ref.shutdown()
    got = [o["output_ids"] for o in engine.generate(PROMPTS, GREEDY)]
    assert got == want


def test_fp16_pool_cached_prompt_gives_the_fresh_bits(engine: Engine) -> None:
    """The prefill (torch) stores and the decode kernels read one pool: a cached run of a prompt reads the K/V
    the fresh run stored, so its logprobs are the same bits."""
    params = dict(GREEDY, max_new_tokens=8)
    prompt = "Describe a sunrise over the mountains in one sentence:"
    engine.flush_cache()
    fresh = engine.generate(prompt, params, return_logprob=True)
    cached = engine.generate(prompt, params, return_logprob=True)
    assert cached["meta_info"]["cached_tokens"] > 0
    assert cached["output_ids"] == fresh["output_ids"]
    assert cached["meta_info"]["output_token_logprobs"] == fresh["meta_info"]["output_token_logprobs"]


def test_bf16_pool_runs_on_the_torch_path() -> None:
    eng = make("bf16")
    try:
        assert eng.scheduler.runner.kv.dtype == torch.bfloat16
        out = eng.generate(PROMPTS[0], dict(GREEDY, max_new_tokens=6, ignore_eos=True))
        assert len(out["output_ids"]) == 6 and out["text"]
        eng.wait_idle()
        eng.check_integrity()
    finally:
        eng.shutdown()


@pytest.mark.parametrize("value", ["fp8", "int8", "half"])
def test_unknown_kv_cache_dtype_is_rejected_naming_the_flag(value: str) -> None:
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        ServerArgs(kv_cache_dtype=value)

"""The real Gemma 3 270M (Q4_K_M GGUF: Q4_K, Q6_K, Q5_0, Q8_0 tensors) against transformers' own GGUF load.

Opt-in model (`make gemma`): skipped with the install command when absent. One prompt longer than the
512-token window, so the local layers' window is exercised on real weights too.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from sgl.runtime.executor.forward_batch import ForwardBatch
from sgl.runtime.executor.kv_cache import KVCache
from sgl.runtime.models.default_model import GEMMA3_INSTALL, GEMMA3_PACKAGE
from tests.runtime.test_gemma3 import import_transformers_gemma3
from tests.runtime.tiny_llama_oracle import greedy_generate, rel_err

pytestmark = [
    pytest.mark.timeout(600),
    pytest.mark.skipif(importlib.util.find_spec(GEMMA3_PACKAGE) is None, reason=f"Gemma 3 not installed: {GEMMA3_INSTALL}"),
    pytest.mark.skipif(importlib.util.find_spec("accelerate") is None, reason="transformers' GGUF load needs accelerate"),
]


@pytest.fixture(scope="module")
def pair():
    import os

    from sgl.runtime.models.default_model import gemma3_model_path
    from sgl.runtime.models.loader import load_model

    torch.set_num_threads(1)
    path = gemma3_model_path()
    ours = load_model(path, show_progress=False)
    import_transformers_gemma3()
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                              dtype=torch.float32, attn_implementation="eager").eval()
    return ours, hf


def _our_logits(loaded, ids: list[int]) -> torch.Tensor:
    kv = KVCache.for_model(loaded.config, len(ids), torch.float32)
    fb = ForwardBatch.from_lists([ids], [list(range(len(ids)))])
    return loaded.model.compute_logits(loaded.model.forward(fb, kv))


def test_logits_and_greedy_tokens_match_transformers_gguf_load(pair) -> None:
    ours, hf = pair
    assert ours.config.architecture == "gemma3" and ours.config.sliding_window == 512
    short = ours.tokenizer.encode("The capital of France is")
    assert short[0] == ours.tokenizer.bos_token_id == 2
    long = ours.tokenizer.encode(" ".join(f"item {i}," for i in range(105)))  # > 512 tokens: past the window
    assert len(long) > 520
    for ids in (short, long):
        with torch.no_grad():
            want = hf(torch.tensor([ids])).logits[0]
        err = rel_err(_our_logits(ours, ids), want)
        assert err < 1e-4, f"prompt of {len(ids)} tokens: relative error {err:.2e}"
    with torch.no_grad():
        want_tokens = hf.generate(torch.tensor([short]), max_new_tokens=12, do_sample=False,
                                  eos_token_id=None)[0, len(short):].tolist()
    assert greedy_generate(ours.model, [short], max_new_tokens=12)[0] == want_tokens


def test_chat_template_and_end_of_turn(pair) -> None:
    ours, _ = pair
    tok = ours.tokenizer
    text = tok.apply_chat_template([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
                                   add_generation_prompt=True)
    assert text == "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\n"
    assert tok.encode(text, add_special_tokens=False)[:2] == [2, 105]  # one BOS, <start_of_turn> as one token
    assert tok.backend.token_to_id("<end_of_turn>") in tok.eos_token_ids

"""The model's building blocks against their plain definitions."""

from __future__ import annotations

import pytest
import torch

from sgl.runtime.executor.kv_cache import KVCache
from sgl.runtime.models.config import ModelConfig
from sgl.runtime.models.llama import LlamaForCausalLM, NormConsts, rms_norm
from sgl.runtime.models.rotary import MAX_MATRIX_TOKENS, RotaryEmbedding
from sgl.runtime.models.weight_arena import HUGE_PAGE

pytestmark = pytest.mark.timeout(60)

CFG = ModelConfig(architecture="llama", vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-5, rope_theta=10000.0,
                  max_position_embeddings=128, tie_word_embeddings=False, attention_bias=True)


def hf_rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


@pytest.mark.parametrize("scale", [1e-4, 1e-2, 1.0, 1e3])  # 1e-4: eps dominates mean(x^2)
def test_rms_norm_matches_hf_formula(scale: float) -> None:
    torch.manual_seed(0)
    x, w = torch.randn(5, 576) * scale, torch.randn(576)
    got = rms_norm(x, w, NormConsts(576, 1e-5, "cpu"))
    torch.testing.assert_close(got, hf_rms_norm(x, w, 1e-5), rtol=1e-5, atol=1e-6)
    xb, wb = x.bfloat16(), w.bfloat16()
    torch.testing.assert_close(rms_norm(xb, wb, NormConsts(576, 1e-5, "cpu")), hf_rms_norm(xb, wb, 1e-5))


def test_rope_matrix_path_equals_elementwise_path() -> None:
    rope = RotaryEmbedding(head_dim=16, theta=10000.0, scaling=None, max_position_embeddings=64)
    rope.ensure(300)  # grows past the initial table
    positions = torch.tensor([0, 5, 63, 64, 299])
    x = torch.randn(5, 3, 16)
    tables = rope.lookup(positions)
    assert tables.matrices is not None and positions.numel() <= MAX_MATRIX_TOKENS
    elementwise = rope.apply(x, tables._replace(matrices=None))
    torch.testing.assert_close(rope.apply(x, tables), elementwise, rtol=1e-6, atol=1e-6)
    # against the textbook definition with rotate_half
    freqs = positions[:, None].float() * rope.inv_freq[None, :]
    cos, sin = torch.cat([freqs.cos()] * 2, -1)[:, None], torch.cat([freqs.sin()] * 2, -1)[:, None]
    rotate_half = torch.cat([-x[..., 8:], x[..., :8]], -1)
    torch.testing.assert_close(elementwise, x * cos + rotate_half * sin, rtol=1e-6, atol=1e-6)
    assert rope.lookup(torch.arange(MAX_MATRIX_TOKENS + 1)).matrices is None  # long prefill: elementwise


def test_parameters_share_one_aligned_buffer_in_forward_order() -> None:
    model = LlamaForCausalLM(CFG)
    buf = model._weights_buffer
    assert buf.data_ptr() % HUGE_PAGE == 0
    ptrs = [p.data_ptr() for p in [model.layers[0].input_layernorm, model.layers[0].qkv_t, model.layers[0].down_t,
                                   model.layers[1].input_layernorm, model.norm, model.lm_head_t, model.embed_tokens]]
    assert ptrs == sorted(ptrs) and len(set(ptrs)) == len(ptrs)
    start, end = buf.data_ptr(), buf.data_ptr() + buf.numel() * buf.element_size()
    for p in model.parameters():
        assert start <= p.data_ptr() and p.data_ptr() + p.numel() * p.element_size() <= end
        assert p.data_ptr() % 64 == 0 and not p.requires_grad


def test_kv_cache_sizes() -> None:
    assert KVCache.bytes_per_slot(CFG, torch.float32) == 2 * 2 * 2 * 8 * 4 == KVCache.bytes_per_slot(CFG, 4)
    kv = KVCache.for_model(CFG, num_slots=10, dtype=torch.bfloat16)
    assert kv.k_buffer(1).shape == (10, 2, 8) and kv.nbytes == 10 * KVCache.bytes_per_slot(CFG, torch.bfloat16)

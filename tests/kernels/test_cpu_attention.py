"""sgl.kernels.cpu.decode_attention (C++ when built, else its torch reference) against the runtime's
paged attention (sgl.kernels.attention, scaled_dot_product_attention) on ragged decode batches."""

from __future__ import annotations

import warnings

import pytest
import torch

from sgl.kernels import attention as ref_attention
from sgl.kernels import cpu
from sgl.kernels import dispatch
from sgl.kernels.cpu import _ext
from sgl.kernels.cpu.attention import decode_attention, decode_attention_reference


@pytest.fixture(params=["ext", "ref"])
def mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setattr(_ext, "disabled", request.param == "ref")
    if request.param == "ext":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if not cpu.extension_available():
                pytest.skip("the C++ extension is not built (python -m sgl.kernels.cpu.build)")
    return request.param


@pytest.mark.parametrize("heads,kv_heads,head_dim", [(9, 3, 64), (4, 4, 20), (8, 2, 16)])
def test_decode_attention_matches_paged_attention(mode: str, heads: int, kv_heads: int, head_dim: int) -> None:
    gen = torch.Generator().manual_seed(heads * 100 + head_dim)
    num_slots = 300
    k_buf = torch.randn(num_slots, kv_heads, head_dim, generator=gen)
    v_buf = torch.randn(num_slots, kv_heads, head_dim, generator=gen)
    lens = [1, 17, 130, 64]
    perm = torch.randperm(num_slots, generator=gen).tolist()
    tables, o = [], 0
    for n in lens:  # scattered slots
        tables.append(perm[o : o + n])
        o += n
    meta = ref_attention.AttentionMetadata.build([1] * len(lens), lens, tables)
    q = torch.randn(len(lens), heads, head_dim, generator=gen) * 3
    want = ref_attention.paged_attention(q, k_buf, v_buf, meta, head_dim**-0.5)
    got = dispatch.paged_attention(q, k_buf, v_buf, meta, head_dim**-0.5)  # the C++ kernel when built
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    d = meta.decode
    direct = decode_attention(q, k_buf, v_buf, d.slots.view(d.batch_size, d.max_len), d.lens, head_dim**-0.5)
    torch.testing.assert_close(direct, want, rtol=1e-5, atol=1e-5)
    oracle = decode_attention_reference(q, k_buf, v_buf, d.slots.view(d.batch_size, d.max_len), d.lens, head_dim**-0.5)
    torch.testing.assert_close(oracle, want, rtol=1e-5, atol=1e-5)


def test_decode_attention_rejects_bad_input(mode: str) -> None:
    q, kb = torch.randn(2, 4, 8), torch.randn(10, 2, 8)
    slots, lens = torch.zeros(2, 3, dtype=torch.int64), torch.tensor([3, 2])
    with pytest.raises(ValueError, match="q must be"):
        decode_attention(q.double(), kb, kb, slots, lens, 0.3)
    with pytest.raises(ValueError, match="k_buf/v_buf"):
        decode_attention(q, torch.randn(10, 3, 8), torch.randn(10, 3, 8), slots, lens, 0.3)
    with pytest.raises(ValueError, match="slots must be"):
        decode_attention(q, kb, kb, slots.int(), lens, 0.3)
    with pytest.raises(ValueError, match="lens must be"):
        decode_attention(q, kb, kb, slots, lens[:1], 0.3)
    if mode == "ext":  # the kernel's own range checks (the reference would index out of range too)
        with pytest.raises(ValueError, match="slot out of range"):
            decode_attention(q, kb, kb, torch.full((2, 3), 10, dtype=torch.int64), lens, 0.3)
        with pytest.raises(ValueError, match="length out of range"):
            decode_attention(q, kb, kb, slots, torch.tensor([4, 1]), 0.3)

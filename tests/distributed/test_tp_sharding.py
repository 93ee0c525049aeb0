"""Tensor-parallel sharding: the head/column plans (pure), and tiny random models sharded over two real
gloo ranks against the unsharded model (logits and greedy tokens), fp32 and native q8_0 weights."""

from __future__ import annotations

import json

import pytest
import torch.multiprocessing as mp

from sgl.runtime.distributed.sharding import ShardPlan, even_bounds
from sgl.runtime.models.config import ModelConfig
from sgl.runtime.processes import free_port
from tests.distributed import tp_harness


def _config(heads: int, kv_heads: int, inter: int = 96, vocab: int = 250) -> ModelConfig:
    return ModelConfig(architecture="llama", vocab_size=vocab, hidden_size=64, intermediate_size=inter,
                       num_hidden_layers=1, num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=16,
                       rms_norm_eps=1e-6, rope_theta=1e4, max_position_embeddings=64, tie_word_embeddings=True,
                       attention_bias=False)


def test_even_bounds_cover_the_range_in_whole_units() -> None:
    assert even_bounds(10, 3) == [(0, 4), (4, 7), (7, 10)]
    assert even_bounds(1536, 2, 32) == [(0, 768), (768, 1536)]
    assert even_bounds(96, 2, 32) == [(0, 64), (64, 96)]


@pytest.mark.parametrize("heads, kv_heads, tp, q, kv", [
    (4, 2, 2, [(0, 2), (2, 4)], [(0, 1), (1, 2)]),  # kv heads divide: Megatron's split
    (9, 3, 2, [(0, 6), (6, 9)], [(0, 2), (2, 3)]),  # SmolLM2-135M: whole GQA groups, 2 + 1
    (4, 1, 2, [(0, 2), (2, 4)], [(0, 1), (0, 1)]),  # fewer kv heads than ranks: kv head 0 on both
    (8, 2, 4, [(0, 2), (2, 4), (4, 6), (6, 8)], [(0, 1), (0, 1), (1, 2), (1, 2)]),
])
def test_heads_go_to_ranks_in_whole_groups(heads, kv_heads, tp, q, kv) -> None:
    plans = [ShardPlan.for_model(_config(heads, kv_heads), r, tp) for r in range(tp)]
    assert [p.q_heads for p in plans] == q and [p.kv_heads for p in plans] == kv
    group = heads // kv_heads
    for p in plans:  # every rank's attention is plain GQA with the model's group size
        assert all(h // group in range(*p.kv_heads) for h in range(*p.q_heads))


def test_vocab_and_intermediate_split_cover_everything() -> None:
    plans = [ShardPlan.for_model(_config(4, 2, inter=96, vocab=251), r, 2) for r in range(2)]
    assert [p.vocab for p in plans] == [(0, 126), (126, 251)]
    assert [p.inter for p in plans] == [(0, 48), (48, 96)]  # 96 is not 2 x whole blocks: units of 1
    assert ShardPlan.for_model(_config(4, 2, inter=128), 1, 2).inter == (64, 128)


def test_impossible_head_split_names_the_reason() -> None:
    with pytest.raises(ValueError, match="tp_size 4 cannot split 6 query heads over 2 kv heads"):
        ShardPlan.for_model(_config(6, 2), 0, 4)


SPECS = {
    "gqa_divides_untied": dict(hidden=64, inter=128, heads=4, kv_heads=2, head_dim=16),
    "gqa_3kv_over_2_bias_tied": dict(hidden=96, inter=96, heads=6, kv_heads=3, head_dim=16, bias=True, tied=True),
    "kv_replicated": dict(hidden=64, inter=128, heads=4, kv_heads=1, head_dim=16),
    "native_q8_gqa": dict(hidden=64, inter=128, heads=4, kv_heads=2, head_dim=16, native=True),
    # MHA, 6 heads of 16 over 2 ranks: o's input split at 48 cuts a q8_0 block (that shard goes fp32)
    "native_q8_cut_block_tied": dict(hidden=96, inter=128, heads=6, kv_heads=6, head_dim=16, native=True, tied=True),
}


@pytest.mark.parametrize("name", sorted(SPECS))
def test_two_ranks_match_the_unsharded_model(tmp_path, name: str) -> None:
    out = tmp_path / "rank0.json"
    mp.start_processes(tp_harness.run_rank, args=(2, free_port(), SPECS[name], str(out)), nprocs=2,
                       start_method="fork", join=True)
    result = json.loads(out.read_text())
    assert result["tokens"] == result["ref_tokens"]
    assert result["rel_diff"] < 1e-5, result  # only the order of a few float sums differs

"""MEDUSA heads: the published checkpoint layout loads (tiny random heads, with and without per-head
lm_heads) and computes what the Medusa formula says; bad checkpoints are errors naming the problem;
the static tree is built from each head's top-k; Draft.cut keeps whole subtrees by depth."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from sgl.runtime.speculative.drafter import Draft
from sgl.runtime.speculative.medusa import MedusaHeads, build_tree, load_medusa_heads, save_medusa_heads

H, V = 16, 40


def _publish(path, num_heads: int, num_layers: int, own_lm_head: bool) -> dict[str, torch.Tensor]:
    """A Medusa folder as its repositories publish it (random weights)."""
    g = torch.Generator().manual_seed(0)
    t: dict[str, torch.Tensor] = {}
    for i in range(num_heads):
        for j in range(num_layers):
            t[f"{i}.{j}.linear.weight"] = torch.randn(H, H, generator=g) * 0.3
            t[f"{i}.{j}.linear.bias"] = torch.randn(H, generator=g) * 0.1
        if own_lm_head:
            t[f"{i}.{num_layers}.weight"] = torch.randn(V, H, generator=g)
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.half() for k, v in t.items()}, str(path / "medusa_lm_head.safetensors"))
    (path / "config.json").write_text(json.dumps({"medusa_num_heads": num_heads, "medusa_num_layers": num_layers,
                                                  "base_model_name_or_path": "tiny"}))
    return {k: v.half().float() for k, v in t.items()}


@pytest.mark.parametrize("own_lm_head", [False, True])
def test_published_layout_loads_and_computes_the_medusa_formula(tmp_path, own_lm_head: bool) -> None:
    t = _publish(tmp_path / "m", num_heads=3, num_layers=2, own_lm_head=own_lm_head)
    heads = load_medusa_heads(str(tmp_path / "m"), H, V)
    shared = torch.randn(V, H)
    x = torch.randn(5, H)
    got = heads.logits(x, lambda h: h @ shared.t())
    for i in range(3):
        y = x
        for j in range(2):
            y = y + F.silu(y @ t[f"{i}.{j}.linear.weight"].t() + t[f"{i}.{j}.linear.bias"])
        w = t[f"{i}.2.weight"] if own_lm_head else shared
        torch.testing.assert_close(got[i], y @ w.t(), atol=1e-4, rtol=1e-4)


def test_save_then_load_round_trip(tmp_path) -> None:
    heads = MedusaHeads(2, 1, H)
    with torch.no_grad():
        for p in heads.parameters():
            p.copy_(torch.randn_like(p))
    save_medusa_heads(heads, str(tmp_path / "h"))
    back = load_medusa_heads(str(tmp_path / "h"), H, V)
    x = torch.randn(3, H)
    torch.testing.assert_close(back.features(x), heads.features(x), atol=2e-2, rtol=2e-2)  # fp16 on disk


@pytest.mark.parametrize("break_it,message", [
    (lambda d: (d / "config.json").unlink(), "needs config.json"),
    (lambda d: (d / "config.json").write_text("{}"), "no medusa_num_heads"),
    (lambda d: (d / "config.json").write_text(json.dumps({"medusa_num_heads": 4, "medusa_num_layers": 1})), "missing"),
])
def test_bad_checkpoints_are_named(tmp_path, break_it, message: str) -> None:
    _publish(tmp_path / "m", 3, 1, False)
    break_it(tmp_path / "m")
    with pytest.raises(ValueError, match=message):
        load_medusa_heads(str(tmp_path / "m"), H, V)


def test_wrong_hidden_size_is_named(tmp_path) -> None:
    _publish(tmp_path / "m", 2, 1, False)
    with pytest.raises(ValueError, match="the target model needs"):
        load_medusa_heads(str(tmp_path / "m"), H * 2, V)


def test_static_tree_from_top_k() -> None:
    topk = [[10, 11, 12], [20, 21], [30]]
    tree = build_tree([(0, 0, 0), (1,), (0,), (0, 1), (2, 0), (1, 0), (0, 0), (5,)], topk)
    # sorted by depth: (0,) (1,) (0,0) (0,1) (1,0) (0,0,0); (2, 0) has no parent (2,), (5,) no top-5
    assert tree.token_ids == [10, 11, 20, 21, 20, 30]
    assert tree.parents == [-1, -1, 0, 0, 1, 2]


def test_draft_cut_by_depth_keeps_whole_subtrees() -> None:
    d = Draft([10, 11, 20, 21, 20, 30], [-1, -1, 0, 0, 1, 2])
    assert d.depths() == [1, 1, 2, 2, 2, 3]
    two = d.cut(2)
    assert (two.token_ids, two.parents) == ([10, 11, 20, 21, 20], [-1, -1, 0, 0, 1])
    three_nodes = d.cut(5, max_nodes=3)
    assert (three_nodes.token_ids, three_nodes.parents) == ([10, 11, 20], [-1, -1, 0])
    chain = Draft([10, 20, 30], [-1, 0, 1]).cut(2)
    assert (chain.token_ids, chain.parents) == ([10, 20], None)
    assert Draft([1, 2, 3]).cut(2).token_ids == [1, 2]

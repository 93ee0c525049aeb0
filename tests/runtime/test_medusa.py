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


@pytest.mark.parametrize("draft_vocab", [False, True])
def test_medusa_drafter_on_a_tiny_model_keeps_outputs_identical(draft_vocab: bool) -> None:
    """Random heads on a tiny model through the scheduler (capture_hidden + hidden_observer, the state
    of index len(fill_ids) - 2 drafting the tree): greedy and seeded outputs identical to no drafts,
    KV integrity after every step, and trees did run. With a draft vocabulary (d2t) every drafted token is
    one of it."""
    import random

    from sgl.runtime.config import ServerArgs
    from sgl.runtime.executor.model_runner import ModelRunner
    from sgl.runtime.protocol import SamplingParams
    from sgl.runtime.scheduler.output import OutputProcessor
    from sgl.runtime.scheduler.request import Req
    from sgl.runtime.scheduler.scheduler import Scheduler
    from sgl.runtime.speculative.medusa import MedusaDrafter, draft_lm_head

    from tests.runtime.test_speculative_verify import PARAMS, Tok, V as TV, run, tiny_model

    model = tiny_model(3)
    heads = MedusaHeads(3, 1, model.config.hidden_size)
    with torch.no_grad():
        for p in heads.parameters():
            p.copy_(0.3 * torch.randn_like(p))
    rng = random.Random(0)
    prompts = [[rng.randrange(TV) for _ in range(rng.randrange(2, 10))] for _ in range(12)]
    params = [SamplingParams(max_new_tokens=rng.randrange(4, 30), **PARAMS[i % len(PARAMS)]) for i in range(12)]
    base, _ = run(model, prompts, params)

    vocab = torch.arange(0, TV, 2)  # every other token
    if draft_vocab:
        heads.d2t = vocab - torch.arange(vocab.numel())
    runner = ModelRunner(model, model.config, 4096, frozenset({1}), capture_hidden=True)
    drafter = MedusaDrafter(heads, draft_lm_head(heads, model))
    runner.hidden_observer = drafter.observe
    drafted: set[int] = set()  # every token the drafter proposed
    propose = drafter.propose

    def recording_propose(reqs: list[Req], k: int) -> list[Draft]:
        drafts = propose(reqs, k)
        for d in drafts:
            drafted.update(d.token_ids)
        return drafts

    drafter.propose = recording_propose
    done: dict[str, Req] = {}
    s = Scheduler(ServerArgs(speculative_max_batch=256, max_running_requests=256, speculative_num_draft_tokens=8),
                  runner, OutputProcessor(Tok(frozenset({1}))), 4096,
                  lambda r: done.__setitem__(r.rid, r) if r.finished else None, drafter=drafter)
    for i, (p, sp) in enumerate(zip(prompts, params)):
        s.add_request(Req(rid=str(i), prompt_ids=p, params=sp, arrival=s.next_arrival()))
    while s.has_work:
        s.step()
        s.check_integrity()
    assert [done[str(i)].output_ids for i in range(12)] == [r.output_ids for r in base]
    assert s.stats.spec_verify_ct > 0 and s.stats.spec_accepted_tokens > 0
    assert drafted <= set(vocab.tolist()) if draft_vocab else not drafted <= set(vocab.tolist())


def test_a_draft_vocabulary_scores_its_rows_of_the_targets_lm_head(tmp_path) -> None:
    """d2t survives the checkpoint (int64, beside the fp16 weights) and draft_lm_head gives the target's logits of
    exactly those tokens; a d2t outside the target's vocabulary is an error naming it."""
    from sgl.runtime.speculative.medusa import draft_lm_head

    from tests.runtime.test_speculative_verify import V as TV, tiny_model

    model = tiny_model(3)
    hidden = model.config.hidden_size
    heads = MedusaHeads(2, 1, hidden)
    vocab = torch.tensor([1, 3, 4])  # of the tiny model's 6 tokens
    heads.d2t = vocab - torch.arange(3)
    save_medusa_heads(heads, str(tmp_path / "h"))
    back = load_medusa_heads(str(tmp_path / "h"), hidden, TV)
    assert torch.equal(back.vocab_ids, vocab)
    x = torch.randn(3, hidden)
    torch.testing.assert_close(draft_lm_head(back, model)(x), model.compute_logits(x)[:, vocab])
    assert draft_lm_head(MedusaHeads(2, 1, hidden), model) == model.compute_logits  # no d2t: the whole vocabulary
    heads.d2t = torch.tensor([0, 0, TV - 2])  # token TV: past the vocabulary
    save_medusa_heads(heads, str(tmp_path / "bad"))
    with pytest.raises(ValueError, match="d2t must be"):
        load_medusa_heads(str(tmp_path / "bad"), hidden, TV)


def test_the_shipped_heads_score_a_draft_vocabulary() -> None:
    """The default model's heads carry d2t (4,096 of its 49,152 tokens): with three full lm_heads a draft cost about
    half a decode step, and the adaptive rule never drafted (benchmarks/speculative_history.md: "The draft
    vocabulary")."""
    from sgl.runtime.speculative.medusa import SHIPPED

    heads = load_medusa_heads(str(SHIPPED), 576, 49152)
    assert heads.num_heads == 3 and heads.vocab_ids is not None and heads.vocab_ids.numel() == 4096
    assert bool((heads.vocab_ids.diff() > 0).all())

"""EAGLE on tiny random models: the head's incremental KV equals its dense forward; a head built to
reproduce a one-layer target exactly has every greedy draft accepted (so the drafter feeds it the
right tokens, positions and context); any head leaves outputs token-identical (greedy and seeded
sampling) with KV integrity after every step; checkpoints load in our layout and EAGLE's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sgl.runtime.config import ServerArgs
from sgl.runtime.executor.model_runner import ModelRunner
from sgl.runtime.models.config import ModelConfig
from sgl.runtime.models.llama import LlamaForCausalLM
from sgl.runtime.protocol import SamplingParams
from sgl.runtime.scheduler.output import OutputProcessor
from sgl.runtime.scheduler.request import Req
from sgl.runtime.scheduler.scheduler import Scheduler
from sgl.runtime.speculative.eagle import EagleDrafter
from sgl.runtime.speculative.eagle_head import EagleConfig, EagleHead, HeadKV, head_extend
from sgl.runtime.speculative.eagle_io import load_head, save_head

from .test_speculative_verify import PARAMS, Tok, tiny_model

pytestmark = pytest.mark.timeout(300)


def random_head(target_cfg: ModelConfig, seed: int = 0, **kw) -> EagleHead:
    torch.manual_seed(seed)
    head = EagleHead(EagleConfig.from_target(target_cfg, **kw))
    with torch.no_grad():
        for name, p in head.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.3 * torch.randn_like(p))
    return head.eval()


def run(model, prompts, params, head=None, eos=frozenset({1}), quantize=None, topk=1, **kw):
    pool = 4096
    runner = ModelRunner(model, model.config, pool, eos)
    drafter = None
    if head is not None:
        drafter = EagleDrafter(head, model, quantize=quantize, topk=topk)
        runner.capture_hidden, runner.hidden_observer = True, drafter.observe
    done: dict[str, Req] = {}
    args = ServerArgs(speculative_max_batch=256, max_running_requests=256, **kw)
    s = Scheduler(args, runner, OutputProcessor(Tok(eos)), pool,
                  lambda r: done.__setitem__(r.rid, r) if r.finished else None, drafter=drafter)
    for i, (p, sp) in enumerate(zip(prompts, params)):
        s.add_request(Req(rid=str(i), prompt_ids=p, params=sp, arrival=s.next_arrival(), return_logprob=True,
                          top_logprobs_num=2))
    while s.has_work:
        s.step()
        s.check_integrity()
    return [done[str(i)] for i in range(len(prompts))], s, drafter


def mixed_requests() -> tuple[list[list[int]], list[SamplingParams]]:
    """18 random prompts, each with one of PARAMS' sampling settings and a random budget."""
    import random

    rng = random.Random(0)
    prompts, params = [], []
    for i in range(18):
        prompts.append([rng.randrange(6) for _ in range(rng.randrange(2, 12))])
        params.append(SamplingParams(max_new_tokens=rng.randrange(1, 30), **PARAMS[i % len(PARAMS)]))
    return prompts, params


def test_incremental_head_equals_dense_forward() -> None:
    cfg = tiny_model(1).config
    head = random_head(cfg, fc_bias=True, final_norm=True)
    L = 10
    emb, feats, pos = torch.randn(L, cfg.hidden_size), torch.randn(L, cfg.hidden_size), torch.arange(5, 5 + L)
    with torch.no_grad():
        dense = head.forward_train(emb[None], feats[None], pos[None])[0]
    kv, o, outs = HeadKV.empty(head.config, cap=2), 0, []
    for n in (3, 1, 4, 2):  # chunks, growing the cache past its capacity
        outs.append(head_extend(head, emb[o:o + n], feats[o:o + n], pos[o:o + n], [kv], [n]))
        o += n
    assert torch.allclose(torch.cat(outs), dense, atol=1e-5)


def exact_target_and_head() -> tuple[LlamaForCausalLM, EagleHead]:
    """A one-layer target whose embedding rows have rms 1 and whose input norm is ones (so the norm is
    the identity), and a head with the target's layer and final norm whose fc passes the embedding
    through: the head's state at every position is the target's."""
    model = tiny_model(5, layers=1)
    with torch.no_grad():
        w = model.hf_weights()
        emb = w["model.embed_tokens.weight"]
        emb.div_(emb.pow(2).mean(-1, keepdim=True).sqrt())
        w["model.layers.0.input_layernorm.weight"].fill_(1.0)
        head = EagleHead(EagleConfig.from_target(model.config, final_norm=True))
        H = model.config.hidden_size
        head.fc.weight.zero_()
        head.fc.weight[:, :H] = torch.eye(H)
        layer = head.layers[0]
        for part in ("q_proj", "k_proj", "v_proj", "o_proj"):
            getattr(layer.self_attn, part).weight.copy_(w[f"model.layers.0.self_attn.{part}.weight"])
        for part in ("gate_proj", "up_proj", "down_proj"):
            getattr(layer.mlp, part).weight.copy_(w[f"model.layers.0.mlp.{part}.weight"])
        layer.post_attention_layernorm.copy_(w["model.layers.0.post_attention_layernorm.weight"])
        head.norm.copy_(w["model.norm.weight"])
    return model, head.eval()


@pytest.mark.parametrize("trim", [False, True])
def test_exact_head_has_every_greedy_draft_accepted(trim: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    if trim:  # old features dropped after every step, the buffers compacted: drafts must not change
        monkeypatch.setattr(EagleDrafter, "TRIM_MARGIN", 2)
        monkeypatch.setattr(EagleDrafter, "COMPACT_AT", 1)
    model, head = exact_target_and_head()
    prompts = [[2, 3, 4, 5], [5, 4, 3, 2, 0, 0, 3], [3]]
    params = [SamplingParams(temperature=0, max_new_tokens=25)] * 3
    no_eos = frozenset({99})  # (ignore_eos would mask a token the head may still propose)
    base, _, _ = run(model, prompts, params, eos=no_eos)
    spec, s, drafter = run(model, prompts, params, head=head, eos=no_eos, speculative_num_draft_tokens=4,
                           chunked_prefill_size=3)  # prompts in chunks: the states arrive in pieces
    assert [r.output_ids for r in spec] == [r.output_ids for r in base]
    assert s.stats.spec_draft_tokens > 20 and s.stats.spec_accepted_tokens == s.stats.spec_draft_tokens
    drafter.propose([], 1)
    assert drafter.num_tracked == 0, "finished requests' head states were kept"


@pytest.mark.parametrize("force_max", [16, 1])
def test_rows_after_jump_forward_draft_past_the_forced_text(force_max: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Under a grammar whose text is forced in runs (jump-forward appends them: the target has no states for
    them yet), the head teacher-forces them over its own states and drafts after them in the same row. With the
    exact head its states are the target's, so every such draft is accepted; outputs stay identical. A forced
    text longer than FORCE_MAX rides without a draft."""
    from sgl.grammars import GrammarCompiler, Vocabulary

    monkeypatch.setattr(EagleDrafter, "FORCE_MAX", force_max)

    model, head = exact_target_and_head()
    tokens = [b"a", b"b", b"c", b"d", b"e", None]  # id 5: EOS
    compiled = GrammarCompiler(Vocabulary.from_bytes(tokens, eos_token_id=5)).compile("regex", "([abe]cd[abe][abe]c)+")
    prompts = [[2, 3, 4, 5], [5, 4, 3, 2, 0, 0, 3], [3], [1, 1]]
    params = [SamplingParams(temperature=0, max_new_tokens=30)] * len(prompts)

    def runs(with_head: bool) -> tuple[list[Req], Scheduler, list[tuple[int, int]]]:
        runner = ModelRunner(model, model.config, 1024, frozenset({5}))
        drafter = None
        if with_head:
            drafter = EagleDrafter(head, model)
            runner.capture_hidden, runner.hidden_observer = True, drafter.observe
        s = Scheduler(ServerArgs(speculative_always_draft=True, speculative_num_draft_tokens=3), runner,
                      OutputProcessor(Tok(frozenset({5}))), 1024, lambda r: None, drafter=drafter)
        rows: list[tuple[int, int]] = []  # (pending tokens, drafts) of every row after the prompt
        run_rows = runner.run

        def logged(batch):  # noqa: ANN001, ANN202
            rows.extend((r.extend_len - r.draft_len, r.draft_len) for r in batch.rows if r.start >= len(r.req.prompt_ids))
            return run_rows(batch)

        runner.run = logged
        reqs = [Req(rid=str(i), prompt_ids=p, params=sp, arrival=s.next_arrival(), grammar=compiled.matcher())
                for i, (p, sp) in enumerate(zip(prompts, params))]
        for r in reqs:
            s.add_request(r)
        while s.has_work:
            s.step()
            s.check_integrity()
        return reqs, s, rows

    base, base_s, _ = runs(False)
    spec, s, rows = runs(True)
    assert base_s.stats.jump_forward_tokens > 10
    assert [r.output_ids for r in spec] == [r.output_ids for r in base]
    forced_rows = [d for pending, d in rows if pending > 1]  # drafts in rows after jump-forward ("cd" after [abe])
    if force_max >= 2:
        assert sum(forced_rows) > 5, rows  # forced text and drafts in one row
    else:
        assert forced_rows and not any(forced_rows), rows
    # every draft is the target's choice; only a request's last row may end at max_new_tokens inside its draft
    assert s.stats.spec_draft_tokens > 40 and s.stats.spec_draft_tokens - s.stats.spec_accepted_tokens <= len(prompts)


def run_with_rollback(model, head, prompt: list[int], at_len: int, keep: int, **kw) -> tuple[Req, Scheduler]:
    """One greedy request; once it has `at_len` output tokens it is rolled back to its first `keep` output tokens (as a
    grammar guard does: runtime/scheduler/rollback.py) and three other tokens than before are forced after them
    (as jump-forward appends them), so the positions after `keep` get other tokens and target states than before,
    and the next draft starts past positions whose head entries are stale."""
    from sgl.runtime.scheduler.rollback import roll_back

    no_eos = frozenset({99})
    runner = ModelRunner(model, model.config, 512, no_eos)
    drafter = None
    if head is not None:
        drafter = EagleDrafter(head, model)
        runner.capture_hidden, runner.hidden_observer = True, drafter.observe
    s = Scheduler(ServerArgs(speculative_always_draft=True, **kw), runner, OutputProcessor(Tok(no_eos)), 512,
                  lambda r: None, drafter=drafter)
    req = Req(rid="r", prompt_ids=prompt, params=SamplingParams(temperature=0, max_new_tokens=40),
              arrival=s.next_arrival())
    s.add_request(req)
    rolled = False
    for _ in range(200):
        if not s.has_work:
            break
        s.step()
        s.check_integrity()
        seq = drafter._seqs.get(req) if drafter is not None else None
        if seq is not None and seq.base >= 0:  # the head's context holds the request's true tokens only
            assert seq.tokens == req.fill_ids[seq.base:seq.base + len(seq.tokens)]
        if not rolled and len(req.output_ids) >= at_len:
            assert not req.finished
            rolled = True
            forced = [(t + 1) % model.config.vocab_size for t in req.output_ids[keep:keep + 3]]
            roll_back(s, req, keep)
            for t in forced:
                s._append(req, t, 0.0, [])
    assert req.finished and rolled
    return req, s


@pytest.mark.parametrize("trim", [False, True])
def test_rollback_drops_the_heads_stale_states(trim: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """After a rollback the rewritten positions' target states replace the old ones in the head's context:
    with the exact head every draft is still accepted (a stale state or head entry would draft the old
    continuation). With old features trimmed (TRIM_MARGIN 2) the rollback lands before the kept window: the
    head's context restarts there (drafts may then miss) and outputs stay identical."""
    if trim:
        monkeypatch.setattr(EagleDrafter, "TRIM_MARGIN", 2)
        monkeypatch.setattr(EagleDrafter, "COMPACT_AT", 1)
    model, head = exact_target_and_head()
    prompt = [2, 3, 4, 5, 0, 3]
    base, _ = run_with_rollback(model, None, prompt, at_len=12, keep=2)
    spec, s = run_with_rollback(model, head, prompt, at_len=12, keep=2, speculative_num_draft_tokens=4)
    assert spec.output_ids == base.output_ids and s.stats.num_backtracks == 0  # (roll_back called directly)
    assert s.stats.spec_draft_tokens > 20
    if not trim:
        assert s.stats.spec_accepted_tokens == s.stats.spec_draft_tokens


@pytest.mark.parametrize("reduced,quantize", [(False, None), (True, None), (True, "q8_0")])
def test_any_head_keeps_outputs_identical(reduced: bool, quantize) -> None:
    model = tiny_model(3)
    head = random_head(model.config, seed=1, draft_vocab_size=4 if reduced else None)
    if reduced:  # draft vocabulary {0, 2, 3, 5}: target id = d + d2t[d]
        head.d2t.copy_(torch.tensor([0, 1, 1, 2]))
    prompts, params = mixed_requests()
    base, _, _ = run(model, prompts, params)
    spec, s, drafter = run(model, prompts, params, head=head, quantize=quantize, speculative_num_draft_tokens=3)
    assert s.stats.spec_verify_ct > 0 and 0 < s.stats.spec_accepted_tokens < s.stats.spec_draft_tokens
    for a, b in zip(base, spec):
        assert b.output_ids == a.output_ids, (a.rid, a.params)
        assert b.output_logprobs == pytest.approx(a.output_logprobs, abs=1e-4)
    if reduced:
        assert s.stats.spec_draft_tokens > 0
    drafter.propose([], 1)
    assert drafter.num_tracked == 0


def _outputs(head: EagleHead, cfg: ModelConfig) -> torch.Tensor:
    torch.manual_seed(9)
    emb, feats = torch.randn(1, 7, cfg.hidden_size), torch.randn(1, 7, cfg.hidden_size)
    with torch.no_grad():
        return head.forward_train(emb, feats, torch.arange(7)[None])


def test_our_file_round_trips_in_fp16(tmp_path: Path) -> None:
    cfg = tiny_model(3).config
    head = random_head(cfg, draft_vocab_size=4)
    head.d2t.copy_(torch.tensor([0, 1, 1, 2]))
    path = save_head(head, tmp_path / "h.safetensors")
    back = load_head(path, cfg)
    assert back.config == head.config and back.d2t.tolist() == [0, 1, 1, 2]
    assert torch.allclose(_outputs(back, cfg), _outputs(head, cfg), atol=2e-2, rtol=1e-2)


@pytest.mark.parametrize("fmt,final_norm", [("bin", False), ("safetensors", False), ("safetensors", True)])
def test_published_eagle_layout_loads(tmp_path: Path, fmt: str, final_norm: bool) -> None:
    """EAGLE-1/2's release: config.json (a one-layer LlamaConfig) + weights named fc.*, layers.0.*, the norms
    as `<name>.weight` (RMSNorm modules; ours are bare parameters), with layer 0's unused input norm and a copy
    of the embedding."""
    cfg = tiny_model(3).config
    head = random_head(cfg, fc_bias=True, final_norm=final_norm)
    sd = {k: v.clone() for k, v in head.state_dict().items() if k != "d2t"}
    for norm in ("layers.0.post_attention_layernorm", "norm"):
        if norm in sd:
            sd[f"{norm}.weight"] = sd.pop(norm)
    sd["layers.0.input_layernorm.weight"] = torch.ones(cfg.hidden_size)
    sd["embed_tokens.weight"] = torch.randn(cfg.vocab_size, cfg.hidden_size)
    folder = tmp_path / "eagle"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "hidden_size": cfg.hidden_size, "intermediate_size": 48,
        "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 1, "rms_norm_eps": 1e-6,
        "vocab_size": cfg.vocab_size, "max_position_embeddings": 256, "rope_theta": cfg.rope_theta}))
    if fmt == "bin":
        torch.save(sd, folder / "pytorch_model.bin")
    else:
        from safetensors.torch import save_file

        save_file(sd, str(folder / "model.safetensors"))
    back = load_head(folder, cfg)
    assert back.config.fc_bias and back.config.final_norm == final_norm
    assert torch.allclose(_outputs(back, cfg), _outputs(head, cfg), atol=1e-6)


def test_bad_checkpoints_are_refused(tmp_path: Path) -> None:
    cfg = tiny_model(3).config
    other = tiny_model(3, hidden=16).config
    path = save_head(random_head(other), tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="hidden size 16"):
        load_head(path, cfg)
    folder = tmp_path / "e3"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"hidden_size": 32, "num_attention_heads": 4}))
    torch.save({"midlayer.self_attn.q_proj.weight": torch.zeros(32, 64), "fc.weight": torch.zeros(32, 96)},
               folder / "pytorch_model.bin")
    with pytest.raises(ValueError, match="EAGLE-3"):
        load_head(folder, cfg)


def test_topk_out_of_range_is_refused() -> None:
    for bad in (0, 17):
        with pytest.raises(ValueError, match="speculative_eagle_topk"):
            ServerArgs(speculative_algorithm="EAGLE", speculative_eagle_topk=bad)


@pytest.mark.parametrize("quantize", [None, "q8_0"])
def test_token_trees_keep_outputs_identical(quantize) -> None:
    """topk > 1: trees of up to 5 nodes (3 children per expanded node, 3 nodes expanded per level), verified in one
    row with a tree mask: greedy and sampled outputs and logprobs as without speculation, and the tree's
    extra branches accept drafts the chain's single path would have missed."""
    model = tiny_model(3)
    head = random_head(model.config, seed=1)
    prompts, params = mixed_requests()
    base, _, _ = run(model, prompts, params)
    chain, sc, _ = run(model, prompts, params, head=head, quantize=quantize, speculative_num_draft_tokens=5,
                       speculative_always_draft=True)
    spec, s, drafter = run(model, prompts, params, head=head, quantize=quantize, topk=3,
                           speculative_num_draft_tokens=5, speculative_always_draft=True)
    for a, b in zip(base, spec):
        assert b.output_ids == a.output_ids, (a.rid, a.params)
        assert b.output_logprobs == pytest.approx(a.output_logprobs, abs=1e-4)
    assert s.stats.spec_verify_ct > 0
    assert s.stats.spec_accepted_tokens / s.stats.spec_verify_ct > sc.stats.spec_accepted_tokens / sc.stats.spec_verify_ct
    drafter.propose([], 1)
    assert drafter.num_tracked == 0


def test_token_tree_shape() -> None:
    """A tree's nodes come parents first, at most `budget` of them, at most num_steps deep; its first level holds
    the head's topk likeliest tokens, so the chain's draft d_1 is among them and the chain's d_1 d_2 is a path."""
    model = tiny_model(3)
    head = random_head(model.config, seed=2)
    prompt = [[2, 3, 4, 5, 0, 3]]
    params = [SamplingParams(temperature=0, max_new_tokens=3)]
    _, s, chain = run(model, prompt, params, head=head)
    req = Req(rid="x", prompt_ids=[2, 3, 4, 5, 0, 3, 1, 2], params=params[0], arrival=0)
    trees = EagleDrafter(head, model, topk=3, num_steps=3)
    for drafter in (chain, trees):  # the target's states of the 8 tokens: one prefill through a runner
        runner = ModelRunner(model, model.config, 64, frozenset({99}))
        runner.capture_hidden, runner.hidden_observer = True, drafter.observe
        sch = Scheduler(ServerArgs(), runner, OutputProcessor(Tok(frozenset({99}))), 64, lambda r: None)
        sch.add_request(req)
        sch.step()
        req = Req(rid="x", prompt_ids=req.prompt_ids, params=params[0], arrival=0)
    r1 = next(iter(chain._seqs)); r2 = next(iter(trees._seqs))
    line = chain.propose([r1], 2)[0]
    tree = trees.propose([r2], 7)[0]
    assert len(tree) <= 7 and tree.parents is not None
    depths = tree.depths()
    assert max(depths) <= 3 and sum(d == 1 for d in depths) == 3
    first = [j for j, d in enumerate(depths) if d == 1]
    assert line.token_ids[0] in [tree.token_ids[j] for j in first]
    j = next(j for j in first if tree.token_ids[j] == line.token_ids[0])
    assert line.token_ids[1] in [tree.token_ids[c] for c, p in enumerate(tree.parents) if p == j]


def test_unrolled_training_steps_equal_drafting() -> None:
    """forward_unrolled's step s at position p == what the drafter computes for d_s's entry there."""
    cfg = tiny_model(1).config
    head = random_head(cfg, final_norm=True)
    L, H = 9, cfg.hidden_size
    emb, feats = torch.randn(L, H), torch.randn(L, H)
    feats[0] = 0
    with torch.no_grad():
        steps = head.forward_unrolled(emb[None], feats[None], torch.arange(L)[None], depth=3)
    for n in (2, 5):  # true entries 0..n, then draft entries n+1, n+2 (their tokens: t_{n+1}, t_{n+2})
        kv = HeadKV.empty(head.config)
        g = head_extend(head, emb[:n + 1], feats[:n + 1], torch.arange(n + 1), [kv], [n + 1])
        assert torch.allclose(g, steps[0][0, :n + 1], atol=1e-5)
        g = g[-1:]
        for s in (2, 3):
            p = n + s - 1
            g = head_extend(head, emb[p:p + 1], g, torch.tensor([p]), [kv], [1])
            assert torch.allclose(g[0], steps[s - 1][0, p], atol=1e-5), (n, s)


def test_quantized_head_drafts_like_the_fp32_one() -> None:
    """q8_0 inference weights: the head's states stay within quantization error of the fp32 ones."""
    cfg = ModelConfig.from_hf(dict(model_type="llama", vocab_size=64, hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=256, rms_norm_eps=1e-6))
    head = random_head(cfg, fc_bias=True, final_norm=True)
    emb, feats = torch.randn(6, 64), torch.randn(6, 64)
    ref = head_extend(head, emb, feats, torch.arange(6), [HeadKV.empty(head.config)], [6])
    head.quantize_for_inference("q8_0")
    got = head_extend(head, emb, feats, torch.arange(6), [HeadKV.empty(head.config)], [6])
    assert not torch.equal(got, ref) and torch.allclose(got, ref, atol=0.05 * float(ref.abs().max()))


def test_fused_head_steps_compute_the_quantized_head(monkeypatch: pytest.MonkeyPatch) -> None:
    """head_extend_fused (the layer in one decode_layer call per entry, the cache as its KV pool) against the
    quantized head's torch path: the same states and cache entries up to the activations' rounding, for two
    sequences extended together from caches that already hold entries."""
    import sgl.runtime.speculative.eagle_head as eagle_head

    cfg = ModelConfig.from_hf(dict(model_type="llama", vocab_size=64, hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=256, rms_norm_eps=1e-6))
    head = random_head(cfg, fc_bias=True, final_norm=True)
    head.quantize_for_inference("q8_0")
    assert head._fused is not None, "the extension runs the head's layer"
    emb, feats = torch.randn(13, 64), torch.randn(13, 64)
    pos = torch.tensor([0, 1, 2, 3, 4, 5, 6, 0, 1, 2, 7, 8, 3])  # seq a: 0..6 then 7, 8; seq b: 0..2 then 3

    def two_sequences() -> tuple[torch.Tensor, list[HeadKV]]:
        caches = [HeadKV.empty(head.config, cap=4), HeadKV.empty(head.config, cap=4)]
        first = head_extend(head, emb[:10], feats[:10], pos[:10], caches, [7, 3])
        return torch.cat([first, head_extend(head, emb[10:], feats[10:], pos[10:], caches, [2, 1])]), caches

    fused, fused_caches = two_sequences()
    monkeypatch.setattr(eagle_head, "FUSED_MAX_ENTRIES", 0)
    ref, ref_caches = two_sequences()
    assert torch.allclose(fused, ref, atol=2e-2 * float(ref.abs().max())), (fused - ref).abs().max()
    for a, b in zip(fused_caches, ref_caches):
        assert a.length == b.length
        assert torch.allclose(a.k[: a.length], b.k[: b.length], atol=2e-2 * float(b.k.abs().max()))
        assert torch.allclose(a.v[: a.length], b.v[: b.length], atol=2e-2 * float(b.v.abs().max()))


def test_trimming_old_features_changes_no_draft(monkeypatch: pytest.MonkeyPatch) -> None:
    """A head that reads its features: the same drafts whether old features are kept or dropped."""
    model = tiny_model(3)
    head = random_head(model.config, seed=2)
    prompts = [[2, 3, 4, 5, 0, 2], [5, 4, 3], [3, 3, 2, 0, 4, 5, 2, 2]]
    params = [SamplingParams(temperature=0, max_new_tokens=40)] * 3

    def drafts(trim: bool) -> list:
        seen: list = []
        orig = EagleDrafter.propose

        def propose(self, reqs, k):
            out = orig(self, reqs, k)
            seen.extend((r.rid, len(r.fill_ids), d.token_ids) for r, d in zip(reqs, out))
            return out

        with monkeypatch.context() as m:
            m.setattr(EagleDrafter, "propose", propose)
            if trim:
                m.setattr(EagleDrafter, "TRIM_MARGIN", 2)
                m.setattr(EagleDrafter, "COMPACT_AT", 1)
            run(model, prompts, params, head=head, eos=frozenset({99}), speculative_num_draft_tokens=3)
        return seen

    kept = drafts(False)
    assert len(kept) >= 5 and kept == drafts(True)


def test_no_shipped_head_for_other_models() -> None:
    from sgl.runtime.speculative.eagle import make_eagle_drafter

    model = tiny_model(3)
    runner = ModelRunner(model, model.config, 64, frozenset({1}))
    with pytest.raises(ValueError, match="needs --speculative-draft-model-path"):
        make_eagle_drafter(None, runner, model_path="/some/llama")

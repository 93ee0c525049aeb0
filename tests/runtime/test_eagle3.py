"""EAGLE-3 heads on tiny random models: the target's kept layer outputs are transformers' hidden states; a head
in EAGLE-3's published layout (midlayer.*, fc over three layers) loads and computes what a dense reference of
SGLang's EAGLE-3 layer computes; the drafter's chains are that reference's greedy chains over the target's
states (so the runner hands over the right layers and positions, fc reduces them, and the head feeds its
pre-norm output back); outputs stay token-identical with KV integrity after every step; bad heads and flags
are refused with messages."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sgl.runtime.config import ServerArgs
from sgl.runtime.executor.model_runner import ModelRunner
from sgl.runtime.models.llama import LlamaForCausalLM
from sgl.runtime.protocol import SamplingParams
from sgl.runtime.scheduler.output import OutputProcessor
from sgl.runtime.scheduler.request import Req
from sgl.runtime.scheduler.scheduler import Scheduler
from sgl.runtime.speculative.eagle import EagleDrafter, make_eagle_drafter
from sgl.runtime.speculative.eagle_io import load_head

from tests.eagle3_heads import eagle3_tensors, reference_logits, write_eagle3

from .test_eagle import mixed_requests, run
from .test_speculative_verify import Tok
from .tiny_llama_oracle import make_hf_model, ours_from_hf

pytestmark = pytest.mark.timeout(300)

LAYERS = 6
AUX = (4, 0, 2)  # kept in this order (not sorted): fc's input order is the config's


@pytest.fixture(scope="module")
def hf_and_ours() -> tuple[object, LlamaForCausalLM]:
    from transformers import LlamaConfig

    hf = make_hf_model(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=LAYERS,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   tie_word_embeddings=False), seed=3)
    return hf, ours_from_hf(hf)


def hf_states(hf: object, ids: list[int]) -> tuple[torch.Tensor, ...]:
    with torch.no_grad():
        return hf(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states  # type: ignore[operator]


def test_kept_layer_outputs_are_transformers_hidden_states(hf_and_ours) -> None:
    hf, model = hf_and_ours
    model.capture_layers = AUX
    try:
        runner = ModelRunner(model, model.config, 512, frozenset({99}))
        seen: dict[int, torch.Tensor] = {}

        def observe(rows, results) -> None:
            for row, res in zip(rows, results):
                for j in range(res.hidden_states.shape[0]):
                    seen[row.start + j] = res.hidden_states[j]

        runner.capture_hidden, runner.hidden_observer = True, observe
        done: dict[str, Req] = {}
        s = Scheduler(ServerArgs(chunked_prefill_size=4), runner, OutputProcessor(Tok(frozenset({99}))), 512,
                      lambda r: done.__setitem__(r.rid, r) if r.finished else None)
        prompt = [3, 9, 27, 17, 51, 25, 11, 33, 5]
        s.add_request(Req(rid="0", prompt_ids=prompt, params=SamplingParams(temperature=0, max_new_tokens=6),
                          arrival=s.next_arrival()))
        while s.has_work:
            s.step()
        seq = prompt + done["0"].output_ids
        states = hf_states(hf, seq[:-1])
        assert sorted(seen) == list(range(len(seq) - 1))  # prefill chunks, then every decode step's token
        for p, got in seen.items():
            want = torch.cat([states[i + 1][0, p] for i in AUX])  # hidden_states[i + 1]: layer i's output
            assert torch.allclose(got, want, atol=1e-4), p
    finally:
        model.capture_layers = ()


def test_published_eagle3_head_loads_and_computes_the_reference(tmp_path: Path, hf_and_ours) -> None:
    _, model = hf_and_ours
    cfg = model.config
    draft_ids = list(range(0, cfg.vocab_size, 2))
    t = eagle3_tensors(cfg.hidden_size, 4, 2, 48, cfg.vocab_size, draft_ids, len(AUX), seed=1)
    head = load_head(write_eagle3(tmp_path / "e3", t, AUX, cfg.vocab_size), cfg)
    c = head.config
    assert c.eagle3 and c.aux_layers == AUX and c.own_lm_head and c.final_norm and c.draft_vocab_size == len(draft_ids)
    assert head.draft_to_target.tolist() == draft_ids
    torch.manual_seed(0)
    L, H = 9, cfg.hidden_size
    emb, aux, pos = torch.randn(L, H), torch.randn(L, len(AUX) * H), torch.arange(3, 3 + L)
    with torch.no_grad():
        feats = head.reduce(aux)
        assert torch.allclose(feats, aux @ t["fc.weight"].T, atol=1e-5)
        g = head.forward_train(emb[None], feats[None], pos[None])[0]
        logits = head.logits_input(g) @ head.lm_head.weight.T
    ref_logits, ref_h = reference_logits(t, emb, feats, pos)
    assert torch.allclose(g, ref_h, atol=1e-4) and torch.allclose(logits, ref_logits, atol=1e-4)


def eagle3_head(tmp_path: Path, model: LlamaForCausalLM, seed: int = 1, aux: tuple[int, ...] = AUX
                ) -> tuple[dict[str, torch.Tensor], Path]:
    cfg = model.config
    t = eagle3_tensors(cfg.hidden_size, 4, 2, 48, cfg.vocab_size, list(range(0, cfg.vocab_size, 2)), len(aux), seed)
    return t, write_eagle3(tmp_path / f"e3_{seed}", t, aux, cfg.vocab_size)


def test_chains_are_the_reference_chains_over_the_targets_states(tmp_path: Path, hf_and_ours) -> None:
    """Every chain the drafter proposes equals the dense reference's greedy chain: the head's context is the entries
    (embed(t_p), fc(target layers' outputs at p - 1)) for p = 0..n (zeros before the first), each drafted token's
    entry reads the previous pre-norm output."""
    hf, model = hf_and_ours
    t, folder = eagle3_head(tmp_path, model)
    runner = ModelRunner(model, model.config, 4096, frozenset({99}))
    drafter = make_eagle_drafter(str(folder), runner, eagle3=True)
    assert model.capture_layers == AUX
    calls: list[tuple[list[int], list[int]]] = []
    propose = drafter.propose

    def recording(reqs, k):
        out = propose(reqs, k)
        for r, d in zip(reqs, out):
            if d.token_ids:
                calls.append((list(r.fill_ids), list(d.token_ids)))
        return out

    drafter.propose = recording  # type: ignore[method-assign]
    done: dict[str, Req] = {}
    try:
        s = Scheduler(ServerArgs(speculative_num_draft_tokens=3, speculative_always_draft=True), runner,
                      OutputProcessor(Tok(frozenset({99}))), 4096,
                      lambda r: done.__setitem__(r.rid, r) if r.finished else None, drafter=drafter)
        for i, p in enumerate([[3, 9, 27, 17, 51, 25], [40, 2, 8]]):
            s.add_request(Req(rid=str(i), prompt_ids=p, params=SamplingParams(temperature=0, max_new_tokens=12),
                              arrival=s.next_arrival()))
        while s.has_work:
            s.step()
            s.check_integrity()
    finally:
        model.capture_layers = ()
    assert len(calls) > 5
    embed = model.embed_weight.detach()
    fc = t["fc.weight"]
    for fill, draft in calls:
        n = len(fill) - 1
        states = hf_states(hf, fill[:n])  # the target's states at positions 0..n - 1
        aux = torch.cat([states[i + 1][0] for i in AUX], -1)  # [n, 3H]
        feats = torch.cat([torch.zeros(1, fc.shape[0]), aux @ fc.T])  # entry p reads f_{p-1}
        emb = embed[torch.tensor(fill)]
        want: list[int] = []
        for _ in draft:
            logits, h = reference_logits(t, emb, feats, torch.arange(emb.shape[0]))
            d = 2 * int(logits[-1].argmax())  # draft id -> target id (the even ids)
            want.append(d)
            emb = torch.cat([emb, embed[d][None]])
            feats = torch.cat([feats, h[-1:]])  # the next entry reads the pre-norm output
        assert want == draft, (fill, draft, want)


@pytest.mark.parametrize("quantize,topk", [(None, 1), ("q8_0", 1), (None, 3)])  # topk 3: token trees
def test_eagle3_keeps_outputs_identical(tmp_path: Path, hf_and_ours, quantize, topk: int) -> None:
    _, model = hf_and_ours
    _, folder = eagle3_head(tmp_path, model, seed=2)
    head = load_head(folder, model.config)
    prompts, params = mixed_requests()
    prompts = [[x * 7 % 64 for x in p] for p in prompts]
    base, _, _ = run(model, prompts, params)
    model.capture_layers = AUX
    try:
        spec, s, drafter = run(model, prompts, params, head=head, quantize=quantize, topk=topk,
                               speculative_num_draft_tokens=3, speculative_always_draft=True)
    finally:
        model.capture_layers = ()
    assert s.stats.spec_verify_ct > 0 and s.stats.spec_draft_tokens > 0
    for a, b in zip(base, spec):
        assert b.output_ids == a.output_ids, (a.rid, a.params)
        assert b.output_logprobs == pytest.approx(a.output_logprobs, abs=1e-4)
    drafter.propose([], 1)
    assert drafter.num_tracked == 0


def test_bad_eagle3_heads_and_flags_are_refused(tmp_path: Path, hf_and_ours) -> None:
    _, model = hf_and_ours
    cfg = model.config
    t = eagle3_tensors(cfg.hidden_size, 4, 2, 48, cfg.vocab_size, list(range(8)), 3, seed=4)
    with pytest.raises(ValueError, match=r"eagle_aux_hidden_state_layer_ids \[1, 2, 9\]"):
        load_head(write_eagle3(tmp_path / "range", t, (1, 2, 9), cfg.vocab_size), cfg)
    with pytest.raises(ValueError, match="name layers"):  # SGLang's default (1, L/2 - 1, L - 4) needs L >= 5
        from .test_speculative_verify import tiny_model

        small = tiny_model(3)  # 2 layers
        t2 = eagle3_tensors(small.config.hidden_size, 4, 2, 48, small.config.vocab_size, list(range(4)), 3, seed=4)
        load_head(write_eagle3(tmp_path / "default_ids", t2, None, small.config.vocab_size), small.config)
    with pytest.raises(ValueError, match="fc.weight"):
        load_head(write_eagle3(tmp_path / "two", t, (1, 2), cfg.vocab_size), cfg)
    with pytest.raises(ValueError, match="only one-layer heads"):
        load_head(write_eagle3(tmp_path / "deep", t, AUX, cfg.vocab_size, num_hidden_layers=2), cfg)
    with pytest.raises(ValueError, match="speculative_draft_model_path"):
        ServerArgs(speculative_algorithm="EAGLE3")
    with pytest.raises(ValueError, match="tp_size"):
        ServerArgs(speculative_algorithm="EAGLE3", speculative_draft_model_path=str(tmp_path), tp_size=2)
    standalone = ServerArgs(speculative_algorithm="STANDALONE", speculative_draft_model_path="x")
    assert standalone.speculative_algorithm == "DRAFT"  # SGLang's name
    # an EAGLE-1 head under --speculative-algorithm EAGLE3
    from sgl.runtime.speculative.eagle_io import save_head

    from .test_eagle import random_head

    one = save_head(random_head(cfg), tmp_path / "one.safetensors")
    runner = ModelRunner(model, cfg, 64, frozenset({99}))
    with pytest.raises(ValueError, match="EAGLE-1/2 head"):
        make_eagle_drafter(str(one), runner, eagle3=True)
    assert isinstance(make_eagle_drafter(str(one), runner), EagleDrafter)  # EAGLE takes it
    assert model.capture_layers == ()

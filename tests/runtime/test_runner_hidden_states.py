"""The runner exposes the final-normed hidden states of the kept input tokens (capture_hidden):
MEDUSA and EAGLE drafters read them. Checked against a plain forward of the same tokens."""

from __future__ import annotations

import torch

from sgl.runtime.executor.forward_batch import ForwardBatch
from sgl.runtime.executor.kv_cache import KVCache
from sgl.runtime.executor.model_runner import ModelRunner
from sgl.runtime.protocol import SamplingParams
from sgl.runtime.scheduler.request import BatchRow, Req, ScheduledBatch

from tests.runtime.test_speculative_verify import tiny_model


def _reference_hidden(model, ids: list[int]) -> torch.Tensor:
    kv = KVCache.for_model(model.config, 64, torch.float32)
    fb = ForwardBatch.from_lists([ids], [list(range(len(ids)))])
    return model(fb, kv)  # [len(ids), H]


def test_prefill_and_verify_rows_carry_the_kept_hidden_states() -> None:
    model = tiny_model(5)
    runner = ModelRunner(model, model.config, 64, frozenset({1}), capture_hidden=True)
    prompt = [2, 3, 4, 5, 2, 3]
    req = Req(rid="r", prompt_ids=prompt, params=SamplingParams(temperature=0.0, max_new_tokens=16), arrival=0)
    (res,) = runner.run(ScheduledBatch([BatchRow(req, prompt, 0, list(range(6)), True, [])]))
    assert torch.allclose(res.hidden_states, _reference_hidden(model, prompt), atol=1e-5)
    req.slots, req.output_ids = list(range(6)), [res.token_id]
    # A verify row: the pending token + a draft whose first token is the target's greedy choice and
    # whose second is wrong: hidden states of the pending token and the accepted draft only.
    seq = prompt + [res.token_id]
    greedy = int(model.compute_logits(_reference_hidden(model, seq)[-1:]).argmax())
    wrong = next(t for t in range(model.config.vocab_size)
                 if t != int(model.compute_logits(_reference_hidden(model, seq + [greedy])[-1:]).argmax()))
    row = BatchRow(req, [res.token_id, greedy, wrong], 6, [6, 7, 8], True, [], draft_len=2)
    (vres,) = runner.run(ScheduledBatch([row]))
    assert [vres.token_id] + vres.next_token_ids[:1] == [greedy, vres.next_token_ids[0]]
    assert len(vres.next_token_ids) == 1 and vres.hidden_states.shape[0] == 2
    assert torch.allclose(vres.hidden_states, _reference_hidden(model, seq + [greedy])[6:], atol=1e-5)


def test_no_hidden_states_unless_asked() -> None:
    model = tiny_model(5)
    runner = ModelRunner(model, model.config, 64, frozenset({1}))
    req = Req(rid="r", prompt_ids=[2, 3], params=SamplingParams(temperature=0.0), arrival=0)
    (res,) = runner.run(ScheduledBatch([BatchRow(req, [2, 3], 0, [0, 1], True, [])]))
    assert res.hidden_states is None


def test_tree_row_carries_the_accepted_paths_states() -> None:
    model = tiny_model(5)
    runner = ModelRunner(model, model.config, 64, frozenset(), capture_hidden=True)
    prompt = [2, 3, 4, 5, 2, 3]
    req = Req(rid="r", prompt_ids=prompt, params=SamplingParams(temperature=0.0, max_new_tokens=16), arrival=0)
    (res,) = runner.run(ScheduledBatch([BatchRow(req, prompt, 0, list(range(6)), True, [])]))
    req.slots, req.output_ids = list(range(6)), [res.token_id]
    seq = prompt + [res.token_id]
    g1 = int(model.compute_logits(_reference_hidden(model, seq)[-1:]).argmax())
    g2 = int(model.compute_logits(_reference_hidden(model, seq + [g1])[-1:]).argmax())
    wrong = (g1 + 1) % model.config.vocab_size
    # nodes: 0 = wrong (child of the pending token), 1 = g1 (its sibling), 2 = g2 (child of g1)
    row = BatchRow(req, [res.token_id, wrong, g1, g2], 6, [6, 9, 7, 8], True, [], draft_len=3,
                   draft_parents=[-1, -1, 1])
    (vres,) = runner.run(ScheduledBatch([row]))
    assert vres.draft_path == [1, 2] and [vres.token_id] + vres.next_token_ids[:1] == [g1, g2]
    assert torch.allclose(vres.hidden_states, _reference_hidden(model, seq + [g1, g2])[6:], atol=1e-5)

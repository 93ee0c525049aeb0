"""PREDICTION's drafts (runtime/speculative/prediction.py): where the output stands in the prediction, a repeated
passage resolved forward, re-synchronizing after an edit, token-id predictions, and the lane serving only requests
that carry a prediction (runtime/scheduler/speculative_rows.py)."""

from __future__ import annotations

from typing import Optional, Union

from sgl.runtime.config import ServerArgs
from sgl.runtime.protocol import SamplingParams
from sgl.runtime.scheduler.request import Req
from sgl.runtime.scheduler.speculative_rows import make_speculative_rows
from sgl.runtime.speculative.ngram import NgramDrafter
from sgl.runtime.speculative.prediction import PredictionDrafter

WORDS = {"w": [1, 2, 3]}


def drafter(vocab: Optional[int] = 100) -> PredictionDrafter:
    return PredictionDrafter(lambda text: WORDS[text], vocab)


def request(prediction: Union[str, list[int], None], output: list[int]) -> Req:
    req = Req(rid="r", prompt_ids=[50, 51], params=SamplingParams(prediction=prediction), arrival=0)
    req.output_ids = list(output)
    return req


def test_a_repeated_passage_resolves_forward() -> None:
    """A line longer than the n-gram window appears twice with different endings: an output that follows the
    prediction step by step drafts the second ending in the second line, not the first's."""
    pred = [1, 2, 3, 4, 5, 6, 1, 2, 3, 4, 5, 7, 8]
    d = drafter()
    req = request(pred, [])
    for t in pred:  # the output writes the prediction, the drafter asked at every step
        req.output_ids.append(t)
        got = d.propose([req], 2)[0].token_ids
        i = len(req.output_ids)
        assert got == pred[i:i + 2], (i, got)


def test_rows_that_repeat_keep_their_alignment() -> None:
    """A list whose rows repeat a 5-token stem, the output taking each 8-token draft whole: its last 4 tokens also
    end the stem of an earlier row, where a search would land; the carried alignment drafts the right row."""
    stem = [1, 2, 3, 4, 5]
    pred = stem + [6] + stem + [6] + stem + [7] + stem + [8]
    d = drafter()
    req = request(pred, [pred[0]])
    while len(req.output_ids) < len(pred):
        i = len(req.output_ids)
        got = d.propose([req], 8)[0].token_ids
        assert got == pred[i:i + 8], (i, got)
        req.output_ids += got + pred[i + len(got):i + len(got) + 1]  # all accepted, and the model's own token


def test_an_edit_stops_drafts_until_the_text_after_it() -> None:
    pred = [1, 2, 3, 4, 5, 6, 7, 8, 9]
    d = drafter()
    req = request(pred, [1, 2, 3])
    assert d.propose([req], 3)[0].token_ids == [4, 5, 6]
    req.output_ids += [40, 41]  # the output departs from the prediction
    assert d.propose([req], 3)[0].token_ids == []
    req.output_ids += [6]  # and joins it again
    assert d.propose([req], 3)[0].token_ids == [7, 8, 9]
    req.output_ids += [7, 8, 9]
    assert d.propose([req], 3)[0].token_ids == []  # the prediction is spent


def test_text_and_token_id_predictions() -> None:
    d = drafter(vocab=3)
    assert d.propose([request("w", [1])], 4)[0].token_ids == [2, 3]  # text: the tokenizer's ids
    assert d.propose([request([1, 7, 2, 9], [1])], 4)[0].token_ids == [2]  # ids past the vocabulary are dropped


def test_the_lane_serves_requests_that_carry_a_prediction() -> None:
    class Tok:
        vocab_size = 100

        def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
            return WORDS[text]

    args = ServerArgs(speculative_algorithm="NGRAM", speculative_always_draft=True, speculative_num_draft_tokens=2)
    rows = make_speculative_rows(args, NgramDrafter(1, 2), Tok(), vocab_size=100)
    assert rows is not None and [lane.name for lane in rows.lanes] == ["PREDICTION", "NGRAM"]
    with_pred, without = request("w", [1]), request(None, [50])  # `without` repeats its prompt: NGRAM drafts
    drafts = rows.drafts([with_pred, without])
    assert drafts[with_pred].token_ids == [2, 3] and with_pred.spec_drafted_by == "PREDICTION"
    assert drafts[without].token_ids == [51, 50] and without.spec_drafted_by == "NGRAM"
    assert "PREDICTION" not in without.spec_lanes  # never offered to the lane
    rows.record(with_pred, 2, 1)
    assert with_pred.spec_lanes["PREDICTION"].drafted == 2 and with_pred.spec_lanes["PREDICTION"].accepted == 1


def test_a_long_prediction_is_read_as_far_as_the_output_can_reach() -> None:
    """A prediction far longer than max_new_tokens (an 8 MB body would be ~2M tokens) is cut before it is tokenized
    and indexed: READ_PER_OUTPUT_TOKEN x (max_new_tokens + 64) tokens."""
    from sgl.runtime.speculative.prediction import READ_PER_OUTPUT_TOKEN

    seen: list[int] = []
    d = PredictionDrafter(lambda text: seen.append(len(text)) or [1] * len(text), 100)
    req = request("x" * 10**6, [1])
    req.params.max_new_tokens = 16
    assert d.propose([req], 4)[0].token_ids == [1, 1, 1, 1]
    limit = READ_PER_OUTPUT_TOKEN * (16 + 64)
    assert seen == [16 * limit] and len(req.draft_state["PREDICTION"].ids) == limit
    ids = request([t % 50 for t in range(10**5)], [0])
    ids.params.max_new_tokens = 16
    d.propose([ids], 4)
    assert len(ids.draft_state["PREDICTION"].ids) == limit

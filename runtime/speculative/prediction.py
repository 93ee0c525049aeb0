"""PREDICTION: drafts from the text the caller expects the answer to be (OpenAI's Predicted Outputs, `prediction`).

A request may carry a prediction (`sampling_params.prediction`: text or token ids; or OpenAI's
`prediction: {"type": "content", "content": ...}`): the document an edit returns mostly unchanged, the code a
refactor keeps, a known answer. The lane drafts the prediction's tokens from where the output stands in it; a
verify row accepts what the model would have produced anyway, so the output is the one without a prediction
(greedy: token for token; sampling: the same distribution, runtime/executor/verify.py), only sooner where it
follows the prediction.

Where the output stands: the alignment of the last draft, carried forward while the output's last MAX_N tokens
agree with the prediction there (text that repeats itself, a list's rows, would mislead a search); else the latest
n-gram of the output (n <= MAX_N, the longest first) found in the prediction, the occurrence at or after the last
draft's end first (a repeated line resolves forward), else the earliest.
Where the output leaves the prediction (an edit), drafting stops until its last tokens are found again (the text
after the edit), so a prediction that is wrong costs few verify rows: the rule (speculative_rows.py) only drafts
for a request whose drafts it expects to pay. The prediction is tokenized once per request, on its first call;
text the output writes with other token boundaries than the prediction's re-synchronizes within MAX_N tokens.

The lane runs before every other lane of `--speculative-algorithm` and serves only requests that carry a
prediction; without an algorithm the scheduler starts a rule with this lane alone when the first such request comes
(speculative_rows.prediction_rows).

    >>> from sgl.runtime.protocol import SamplingParams
    >>> enc = {"a b c d e": [1, 2, 3, 4, 5]}
    >>> d = PredictionDrafter(lambda text: enc[text], vocab_size=10)
    >>> req = Req(rid="r", prompt_ids=[9, 9], params=SamplingParams(prediction="a b c d e"), arrival=0)
    >>> req.output_ids = [1, 2]
    >>> d.propose([req], 2)[0].token_ids
    [3, 4]
    >>> req.output_ids = [1, 2, 7]   # the output left the prediction
    >>> d.propose([req], 2)[0].token_ids
    []
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

from sgl.runtime.scheduler.request import Req
from sgl.runtime.speculative.drafter import Draft

MAX_N = 4  # the longest n-gram of the output looked up in the prediction
# A prediction is read up to this many times the request's max_new_tokens (+ 64) tokens; past that it could only
# matter after an edit deleted more than all the output's tokens, and an 8 MB body (--max-request-bytes) of text would
# otherwise be tokenized and indexed (~4 n-grams a token) on the scheduler thread. Text is cut at 16 characters a
# token before tokenizing (a token is ~4 characters of English or code).
READ_PER_OUTPUT_TOKEN = 8


@dataclass
class _Prediction:
    ids: list[int]
    ends: dict[tuple[int, ...], list[int]] = field(default_factory=dict)  # n-gram -> its ends, ascending
    offset: Optional[int] = None  # the last match's end in `ids` minus the output's length then (the alignment)
    cursor: int = 0  # the last match's end: a search prefers an occurrence at or after it

    def __post_init__(self) -> None:
        for e in range(1, len(self.ids) + 1):
            for n in range(1, min(MAX_N, e) + 1):
                self.ends.setdefault(tuple(self.ids[e - n:e]), []).append(e)

    def continuation(self, produced: Sequence[int], k: int) -> list[int]:
        """Up to k tokens of the prediction after where the output stands in it ([] when it is not there)."""
        e = self._aligned(produced)
        if e is None:
            e = self._search(produced)
        if e is None:
            return []
        self.offset, self.cursor = e - len(produced), e
        return self.ids[e:e + k]

    def _aligned(self, produced: Sequence[int]) -> Optional[int]:
        """The last match's alignment carried forward, if the output's last tokens still agree with it: in text
        that repeats itself (a list's rows, a loop) an n-gram search can land on an earlier repetition."""
        if self.offset is None:
            return None
        e = len(produced) + self.offset
        n = min(MAX_N, len(produced), e)
        ok = 0 < e <= len(self.ids) and n > 0 and list(produced[len(produced) - n:]) == self.ids[e - n:e]
        return e if ok else None

    def _search(self, produced: Sequence[int]) -> Optional[int]:
        """The end of the output's latest n-gram in the prediction, the longest first."""
        for n in range(min(MAX_N, len(produced)), 0, -1):
            ends = self.ends.get(tuple(produced[len(produced) - n:]))
            if ends:
                i = bisect_left(ends, self.cursor)
                return ends[i] if i < len(ends) else ends[0]
        return None


class PredictionDrafter:
    name = "PREDICTION"
    # per-draft acceptance before a request has any: the caller says the output is this text
    accept_prior = 0.9

    def __init__(self, encode: Callable[[str], list[int]], vocab_size: Optional[int]) -> None:
        """`encode`: text -> token ids without special tokens (the engine's tokenizer); a prediction given as token
        ids drafts those below `vocab_size` (the model's: the others cannot be the output's; None: all)."""
        self.encode, self.vocab_size = encode, vocab_size

    def serves(self, req: Req) -> bool:
        """Only requests that carry a prediction are offered to this lane."""
        return bool(req.params.prediction)

    def propose(self, reqs: Sequence[Req], k: int) -> list[Draft]:
        out = []
        for req in reqs:
            pred = req.draft_state.get(self.name)
            if pred is None:
                limit = READ_PER_OUTPUT_TOKEN * (req.params.max_new_tokens + 64)
                given = req.params.prediction or ""
                ids = self.encode(given[:16 * limit]) if isinstance(given, str) else [
                    t for t in given[:limit] if self.vocab_size is None or t < self.vocab_size]
                pred = req.draft_state[self.name] = _Prediction(ids[:limit])
            out.append(Draft(pred.continuation(req.output_ids, k)))  # the output so far, its pending token last
        return out


def prediction_drafter(tokenizer: Any, vocab_size: Optional[int]) -> PredictionDrafter:
    """The PREDICTION lane's drafter over the engine's tokenizer; `vocab_size`: the model's (None: the tokenizer's)."""
    return PredictionDrafter(lambda text: tokenizer.encode(text, add_special_tokens=False),
                             vocab_size or getattr(tokenizer, "vocab_size", None))

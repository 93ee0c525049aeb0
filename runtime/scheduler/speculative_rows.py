"""The scheduler's side of speculative decoding: which decoding requests get a draft this step, and
the acceptance counters. No tensors.

A verify row holds [pending token(s)] + draft, one new KV slot per token (several pending tokens
after jump-forward: the forced text, then the drafts). After the step the scheduler keeps the slots
of the pending tokens and of the accepted drafts, and frees the rest at once: with `m` tokens
appended, the last pending token and d_1..d_{m-1} (which equal the appended t_0..t_{m-2}) keep
their slots; the last appended token becomes the new pending one.

The adaptive rule: a verify row of 1 + j tokens costs about 1 + VERIFY_COST * j decode steps on a
CPU (small-M matmuls are not free), so drafts that keep failing slow a request down. Each request
keeps an estimate of its per-draft acceptance (`Req.spec_accept_prob`, an exponential average over
its verify rows); below VERIFY_COST (where even one draft no longer pays) it stops drafting, and the
estimate drifts back toward the prior step by step, so it tries again later. Otherwise it asks for k.
Measured on the default model (NGRAM, 1 thread): a fixed-length ladder (+2 after a full accept, as
Hugging Face's assisted generation) lost ~30% of the accepted tokens of copy phases, because
acceptance is bimodal (copying or not) and each copy phase restarted short.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

from sgl.runtime.config import ServerArgs
from sgl.runtime.metrics import record_spec_accept_length
from sgl.runtime.speculative.drafter import Drafter
from sgl.runtime.cache.allocator import SlotAllocator
from sgl.runtime.scheduler.request import BatchRow, Req, RowResult


@dataclass
class SpecStats:
    verify_ct: int = 0  # verify rows run (rows with a non-empty draft)
    draft_tokens: int = 0  # drafts proposed in those rows
    accepted_tokens: int = 0  # drafts the target accepted

    @property
    def accept_rate(self) -> float:
        return self.accepted_tokens / self.draft_tokens if self.draft_tokens else 0.0

    @property
    def accept_length(self) -> float:
        """Mean tokens produced per verify row (accepted drafts + the target's own token)."""
        return (self.accepted_tokens + self.verify_ct) / self.verify_ct if self.verify_ct else 0.0


VERIFY_COST = 0.25  # extra decode-step cost per verified draft token (measured: 5 tokens ~ 1.9x one, 1 thread)
PRIOR, EMA, DRIFT = 0.6, 0.5, 0.1  # acceptance prior, weight of the newest verify row, pull back when idle


class SpeculativeRows:
    def __init__(self, args: ServerArgs, drafter: Drafter) -> None:
        self.drafter = drafter
        self.k = args.speculative_num_draft_tokens
        self.max_batch = args.speculative_max_batch
        self.stats = SpecStats()

    def drafts(self, decoding: Sequence[Req]) -> dict[Req, list[int]]:
        """Non-empty drafts for some of `decoding` (requests with one pending token), or {}.

        No drafts when the batch is compute-bound (more rows than `--speculative-max-batch`): a
        verify row of 1 + k tokens then costs about 1 + k decode rows. A draft never asks for more
        tokens than the request may still produce (t_0 plus k accepted drafts <= room)."""
        if not decoding or len(decoding) > self.max_batch:
            return {}
        want = {}
        for req in decoding:
            if req.spec_accept_prob < VERIFY_COST:
                req.spec_accept_prob += DRIFT * (PRIOR - req.spec_accept_prob)
                want[req] = 0
            else:
                want[req] = self.k
        asking = [r for r in decoding if want[r] > 0]
        out: dict[Req, list[int]] = {}
        if not asking:
            return out
        for req, draft in zip(asking, self.drafter.propose(asking, max(want[r] for r in asking))):
            room = req.params.max_new_tokens - len(req.output_ids) - 1
            ids = draft.token_ids[: max(0, min(want[req], room))]
            if ids:
                out[req] = list(ids)
        return out

    def record(self, req: Req, draft_len: int, accepted: int) -> None:
        """One verify row ran: `accepted` of its `draft_len` drafts matched the target's tokens."""
        record_spec_accept_length(1 + accepted)  # tokens this verify step produced
        # MLE of a per-draft acceptance probability from one row: `accepted` successes, then one
        # rejection unless every draft was accepted.
        observed = accepted / (accepted + (accepted < draft_len))
        req.spec_accept_prob = (1 - EMA) * req.spec_accept_prob + EMA * observed
        req.spec_verify_ct += 1
        req.spec_accepted_tokens += accepted
        self.stats.verify_ct += 1
        self.stats.draft_tokens += draft_len
        self.stats.accepted_tokens += accepted


    def trim_verify_row(self, allocator: SlotAllocator, row: BatchRow, res: RowResult, appended: int) -> None:
        """After a verify row's step (its new slots already in `req.slots`): keep the KV of the pending
        token(s) and the accepted drafts, free the rejected drafts' slots now (module docstring)."""
        req = row.req
        keep = max(appended, 1)  # the last pending token's KV is valid even if nothing was appended
        cut = row.start + row.extend_len - row.draft_len - 1 + keep
        assert req.slots[row.start:] == row.new_slots
        allocator.free(req.slots[cut:])
        del req.slots[cut:]
        self.record(req, row.draft_len, len(res.next_token_ids))

def make_speculative_rows(args: ServerArgs, drafter: Optional[Drafter]) -> Optional[SpeculativeRows]:
    return SpeculativeRows(args, drafter) if drafter is not None else None

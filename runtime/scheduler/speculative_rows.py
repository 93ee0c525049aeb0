"""The scheduler's side of speculative decoding: which decoding requests get a draft this step, and
the acceptance counters. No tensors.

A verify row holds [pending token(s)] + draft, one new KV slot per token (several pending tokens
after jump-forward: the forced text, then the drafts). After the step the scheduler keeps the slots
of the pending tokens and of the accepted drafts, and frees the rest at once: with `m` tokens
appended, the last pending token and d_1..d_{m-1} (which equal the appended t_0..t_{m-2}) keep
their slots; the last appended token becomes the new pending one. A tree draft is the same with
d_1..d_{m-1} the first m - 1 nodes of the accepted path (RowResult.draft_path): the pool is
token-slot based, so the request's slot table just takes those nodes' slots in path order (their K/V
were computed at the positions the path gives them) and the other nodes' slots go back to the pool.

The adaptive rule: a verify row of 1 + j tokens costs verify_cost(j) decode steps on a CPU (small-M
matmuls are not free: measured on the default model, 1 thread, `bench_speculative.py --verify-cost`:
1.51x at j = 1, 1.77x at 2, 2.73x at 4, 3.53x at 8; the attention is not the cost: the same rows laid
out as decode rows take as long). Each request keeps an estimate a of its per-draft acceptance
(`Req.spec_accept_prob`, an exponential average over its verify rows) and asks for the draft length j
<= k that maximizes the expected tokens per step over the cost, (1 - a^(j+1)) / (1 - a) / verify_cost(j)
(Leviathan et al.'s speedup with our cost curve): long drafts while it copies (a near 1), short ones
on chat, none when even one draft does not pay; the estimate then drifts back toward the prior step
by step, so it tries again later. A tree's nodes count as its j. Measured on the default model
(NGRAM, 1 thread): a fixed-length ladder (+2 after a full accept, as Hugging Face's assisted
generation) lost ~30% of the accepted tokens of copy phases, because acceptance is bimodal (copying
or not) and each copy phase restarted short; the EMA reaches a = 0.9 after two full accepts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

from sgl.runtime.config import ServerArgs
from sgl.runtime.metrics import record_spec_accept_length
from sgl.runtime.speculative.drafter import Draft, Drafter
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


PRIOR, EMA, DRIFT = 0.6, 0.5, 0.1  # acceptance prior, weight of the newest verify row, pull back when idle


def verify_cost(j: int) -> float:
    """Decode steps one verify row of 1 + j tokens costs (a fit of the measurements above)."""
    return 1.0 + 0.45 * j ** 0.85


def best_draft_len(a: float, k: int) -> int:
    """The j in 0..k maximizing expected tokens per step / cost for per-draft acceptance a."""
    best, best_rate = 0, 1.0
    for j in range(1, k + 1):
        expected = j + 1.0 if a >= 1.0 else (1.0 - a ** (j + 1)) / (1.0 - a)
        rate = expected / verify_cost(j)
        if rate > best_rate:
            best, best_rate = j, rate
    return best


class SpeculativeRows:
    def __init__(self, args: ServerArgs, drafter: Drafter) -> None:
        self.drafter = drafter
        self.k = args.speculative_num_draft_tokens
        self.max_batch = args.speculative_max_batch
        self.stats = SpecStats()

    def drafts(self, decoding: Sequence[Req]) -> dict[Req, Draft]:
        """Non-empty drafts for some of `decoding` (requests with one pending token), or {}.

        No drafts when the batch is compute-bound (more rows than `--speculative-max-batch`): a
        verify row of 1 + k tokens then costs about 1 + k decode rows. A draft never asks for more
        tokens than the request may still produce (t_0 plus the accepted path <= room): a tree is cut
        by depth."""
        if not decoding or len(decoding) > self.max_batch:
            return {}
        want = {}
        for req in decoding:
            want[req] = best_draft_len(req.spec_accept_prob, self.k)
            if want[req] == 0:
                req.spec_accept_prob += DRIFT * (PRIOR - req.spec_accept_prob)
        asking = [r for r in decoding if want[r] > 0]
        out: dict[Req, Draft] = {}
        if not asking:
            return out
        for req, draft in zip(asking, self.drafter.propose(asking, max(want[r] for r in asking))):
            room = req.params.max_new_tokens - len(req.output_ids) - 1
            cut = draft.cut(max(0, room), want[req])
            if len(cut):
                out[req] = cut
        return out

    def record(self, req: Req, draft_len: int, accepted: int, depth: Optional[int] = None) -> None:
        """One verify row ran: `accepted` of its `draft_len` drafts matched the target's tokens
        (`depth`: a tree's deepest level; a chain's is its length)."""
        record_spec_accept_length(1 + accepted)  # tokens this verify step produced
        # MLE of a per-level acceptance probability from one row: `accepted` successes, then one
        # rejection unless the path reached the deepest level.
        depth = draft_len if depth is None else depth
        observed = accepted / (accepted + (accepted < depth))
        req.spec_accept_prob = (1 - EMA) * req.spec_accept_prob + EMA * observed
        req.spec_verify_ct += 1
        req.spec_accepted_tokens += accepted
        self.stats.verify_ct += 1
        self.stats.draft_tokens += draft_len
        self.stats.accepted_tokens += accepted


    def trim_verify_row(self, allocator: SlotAllocator, row: BatchRow, res: RowResult, appended: int) -> None:
        """After a verify row's step (its new slots already in `req.slots`): keep the KV of the pending
        token(s) and the accepted drafts (a tree: its accepted path, in order), free the rejected
        drafts' slots now (module docstring)."""
        req = row.req
        assert req.slots[row.start:] == row.new_slots
        kept, freed = verify_row_slots(row, res, appended)
        allocator.free(freed)
        req.slots[row.start:] = kept
        depth = None if row.draft_parents is None else max(Draft(row.draft, row.draft_parents).depths())
        self.record(req, row.draft_len, len(res.next_token_ids), depth)


def verify_row_slots(row: BatchRow, res: RowResult, appended: int) -> tuple[list[int], list[int]]:
    """(kept, freed) of the row's new slots when `appended` of its produced tokens were kept (the
    pending tokens' slots stay even when nothing was appended: their K/V is valid)."""
    pending = row.extend_len - row.draft_len
    nodes = row.new_slots[pending:]
    keep = max(appended, 1) - 1  # accepted drafts whose tokens were appended (t_0..t_{m-2})
    # a chain's accepted drafts are its first nodes; a tree's are its accepted path
    path = list(range(keep)) if row.draft_parents is None else res.draft_path[:keep]
    kept = row.new_slots[:pending] + [nodes[c] for c in path]
    on_path = set(path)
    return kept, [s for c, s in enumerate(nodes) if c not in on_path]


def make_speculative_rows(args: ServerArgs, drafter: Optional[Drafter]) -> Optional[SpeculativeRows]:
    return SpeculativeRows(args, drafter) if drafter is not None else None

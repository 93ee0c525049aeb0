"""Rolling a running request back to its first N output tokens (semantic-guard backtracking).

After `roll_back(sched, req, keep)`:
  - output_ids, output logprobs and the text state hold the first `keep` output tokens; the request is
    unfinished again;
  - the KV of every position >= prompt + keep - 1 is gone: the last kept token is pending again, so
    the next step is a decode row that recomputes it and samples a new token from its logits;
  - KV slots owned by the request alone are freed; slots that belong to the radix tree (a prefill
    chunk or a jump-forward extend was cached with the lock kept) stay in the tree: the request
    re-matches the kept prefix, locks that node and unlocks the old one (never frees tree slots);
  - the grammar matcher is rolled back by the same number of tokens, and the sampler's per-request
    state (penalty counters) is rebuilt from the kept output.
KV integrity (free + cached + owned == pool) holds before and after.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sgl.runtime.protocol import finish_reason_abort
from sgl.runtime.scheduler.request import Req

if TYPE_CHECKING:
    from sgl.runtime.scheduler.scheduler import Scheduler


def apply_guard(sched: "Scheduler", req: Req) -> bool:
    """Call after the grammar accepted a token: a guard failure past its backtrack budget aborts the
    request; a guard violation rolls it back. True if either happened."""
    g = req.grammar
    if g is None:
        return False
    if g.error is not None:  # accept() succeeded but the guard gave up (budget spent): name the keyword
        req.finish_reason = finish_reason_abort(g.error)
        return True
    take = getattr(g, "take_rollback", None)
    keep = take() if take is not None else None
    if keep is None:
        return False
    roll_back(sched, req, keep)
    sched.stats.num_backtracks += 1
    return True


def roll_back(sched: "Scheduler", req: Req, keep: int) -> None:
    """Truncate `req` to its first `keep` output tokens (see the module docstring)."""
    drop = len(req.output_ids) - keep
    assert 0 <= keep and drop > 0, f"roll back to {keep} of {len(req.output_ids)} output tokens"
    sched.stats.backtracked_tokens += drop
    del req.output_ids[keep:]
    if req.return_logprob:
        del req.output_logprobs[keep:]
        del req.output_top_logprobs[keep:]
    req.finish_reason = None
    sched.output.rewind(req)
    if req.sampling_state is not None and hasattr(req.sampling_state, "rewind"):
        req.sampling_state.rewind(req.output_ids)
    if req.grammar is not None:
        req.grammar.rollback(drop)
    _truncate_kv(sched, req, len(req.prompt_ids) + keep - 1)


def _truncate_kv(sched: "Scheduler", req: Req, kv_len: int) -> None:
    """Keep the KV of positions [0, kv_len) only."""
    if req.kv_len <= kv_len:
        return
    if kv_len >= req.cached_len:  # everything dropped is the request's own
        sched.allocator.free(req.slots[kv_len:])
        del req.slots[kv_len:]
        return
    # Part of what is dropped belongs to the tree: free only our own slots and re-lock a shorter prefix.
    sched.allocator.free(req.slots[req.cached_len:])
    old = req.last_node
    m = sched.cache.match_prefix(req.fill_ids[:kv_len], req.cache_namespace)
    assert len(m.slots) == kv_len and m.slots == req.slots[:kv_len], "the tree must hold the kept prefix"
    sched.cache.lock(m.node)
    if old is not None:
        sched.cache.unlock(old)
    req.last_node, req.slots, req.cached_len = m.node, list(m.slots), kv_len

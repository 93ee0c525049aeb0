"""NGRAM lookups: own sequence first, then finished requests' sequences (the shared index, bounded by
its capacity); several continuations become one token tree."""

from __future__ import annotations

from sgl.runtime.protocol import SamplingParams
from sgl.runtime.scheduler.request import Req
from sgl.runtime.speculative.ngram import NgramDrafter


def _req(rid: str, prompt: list[int], output: list[int] = ()) -> Req:
    r = Req(rid=rid, prompt_ids=list(prompt), params=SamplingParams(), arrival=0)
    r.output_ids = list(output)
    return r


def test_a_finished_requests_sequence_drafts_for_a_new_one() -> None:
    d = NgramDrafter(2, 3, capacity=100)
    a = _req("a", [1, 2, 3], [40, 41, 42, 43, 44])
    assert d.propose([a], 4)[0].token_ids == []  # nothing to match yet
    a.finish_reason = {"type": "stop"}
    b = _req("b", [9, 8, 41, 42])
    assert d.propose([b], 3)[0].token_ids == [43, 44]  # filed when `a` was seen finished
    own = NgramDrafter(2, 3)  # capacity 0: own sequence only
    own.propose([a], 4)
    assert own.propose([_req("c", [9, 8, 41, 42])], 3)[0].token_ids == []


def test_own_occurrences_come_first_then_shared_ones_fill_the_tree() -> None:
    d = NgramDrafter(2, 2, max_breadth=2, capacity=100)
    a = _req("a", [5, 6, 70, 71])
    d.propose([a], 2)
    a.finish_reason = {"type": "stop"}
    b = _req("b", [5, 6, 30, 31, 5, 6])
    draft = d.propose([b], 2)[0]
    assert (draft.token_ids, draft.parents) == ([30, 31, 70], [-1, 0, -1])


def test_capacity_drops_the_oldest_sequences() -> None:
    d = NgramDrafter(2, 2, capacity=8)
    for i, seq in enumerate([[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]]):
        r = _req(str(i), seq)
        d.propose([r], 2)
        r.finish_reason = {"type": "stop"}
    d.propose([], 2)
    assert d.propose([_req("x", [0, 1, 2])], 2)[0].token_ids == []  # [1..5] was dropped (5 + 5 > 8)
    assert d.propose([_req("y", [0, 7, 8])], 2)[0].token_ids == [9, 10]


def test_shared_continuations_merge_into_a_trie() -> None:
    d = NgramDrafter(2, 2, max_breadth=3, capacity=100)
    for i, seq in enumerate([[1, 2, 3, 4, 5], [1, 2, 3, 9, 9], [1, 2, 7, 7, 7]]):
        r = _req(str(i), seq)
        d.propose([r], 2)
        r.finish_reason = {"type": "stop"}
    draft = d.propose([_req("q", [0, 1, 2])], 4)[0]
    # newest first: [7, 7, 7, ...] gets 4 tokens, then [3, 9] and [3, 4] (k // 2) share their first node
    assert (draft.token_ids, draft.parents) == ([7, 7, 7, 3, 9, 4], [-1, 0, 1, -1, 3, 3])


def test_flush_forgets_finished_sequences_through_the_scheduler_hook() -> None:
    from sgl.runtime.config import ServerArgs
    from sgl.runtime.scheduler.speculative_rows import SpeculativeRows

    d = NgramDrafter(2, 3, capacity=100)
    rows = SpeculativeRows(ServerArgs(model_path="default", speculative_algorithm="NGRAM"), d)
    a = _req("a", [1, 2, 3], [40, 41, 42, 43, 44])
    d.propose([a], 4)
    a.finish_reason = {"type": "stop"}
    assert d.propose([_req("b", [9, 8, 41, 42])], 3)[0].token_ids == [43, 44]
    rows.flush()  # what Scheduler.flush_cache calls (the server's /flush_cache)
    assert d.propose([_req("c", [9, 8, 41, 42])], 3)[0].token_ids == []
    f = _req("f", [1, 2, 3], [40, 41, 42, 50])  # the index fills again after a flush
    d.propose([f], 4)
    f.finish_reason = {"type": "stop"}
    assert d.propose([_req("e", [9, 8, 41, 42])], 3)[0].token_ids == [50]

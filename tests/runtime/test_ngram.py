"""NGRAM lookups: own sequence first, then finished requests' sequences (the shared index, bounded by
its capacity); several continuations become one token tree. CORPUS: a fixed corpus's most frequent
continuations, and its files."""

from __future__ import annotations

import collections
import random

import pytest

from sgl.runtime.protocol import SamplingParams
from sgl.runtime.scheduler.request import Req
from sgl.runtime.speculative.ngram import NgramDrafter
from sgl.runtime.speculative.ngram_corpus import CorpusDrafter, CorpusIndex


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


def test_the_corpus_drafts_its_most_frequent_continuation() -> None:
    # [5, 6] is followed by 7 twice and by 9 once in the corpus: the chain takes 7's; a tree takes both, 7's first
    corpus = [[5, 6, 9, 1], [5, 6, 7, 8], [2, 5, 6, 7, 3]]
    d = CorpusDrafter(corpus, 2, 2)
    assert d.propose([_req("a", [4, 5, 6])], 3)[0].token_ids in ([7, 8], [7, 3])
    tree = CorpusDrafter(corpus, 2, 2, max_breadth=2).propose([_req("b", [4, 5, 6])], 2)[0]
    assert tree.token_ids[0] == 7 and 9 in tree.token_ids and tree.parents is not None
    # a continuation stops at its sequence's end (never runs into the next sequence)
    assert CorpusDrafter([[1, 2, 3], [4, 5, 6]], 2, 2).propose([_req("c", [0, 1, 2])], 4)[0].token_ids == [3]
    # the longest match first; none: no draft
    assert CorpusDrafter([[1, 2, 3, 4], [9, 2, 3, 5]], 2, 3).propose([_req("d", [1, 2, 3])], 1)[0].token_ids == [4]
    assert CorpusDrafter(corpus, 2, 2).propose([_req("e", [8, 8])], 2)[0].token_ids == []
    # n-grams longer than every sequence: no table for them
    assert CorpusDrafter([[1, 2, 3]], 2, 4).propose([_req("f", [9, 1, 2])], 2)[0].token_ids == [3]


@pytest.mark.parametrize("seed", range(5))
def test_corpus_index_keeps_the_most_frequent_next_tokens(seed: int) -> None:
    """Against a dict reference on random corpora (a small vocabulary: many repeats): per n-gram, the kept next
    tokens are its `breadth` most frequent ones, each continuation really follows the n-gram in the corpus."""
    rng = random.Random(seed)
    seqs = [[rng.randrange(5) for _ in range(rng.randrange(3, 40))] for _ in range(20)]
    breadth, k = 2, 3
    index = CorpusIndex(seqs, 2, 3, breadth)
    follows: dict[tuple[int, ...], collections.Counter] = {}
    conts: dict[tuple[int, ...], set] = {}
    for seq in seqs:
        for e in range(2, len(seq)):
            for n in (2, 3):
                if e >= n:
                    gram = tuple(seq[e - n:e])
                    follows.setdefault(gram, collections.Counter())[seq[e]] += 1
                    conts.setdefault(gram, set()).add(tuple(seq[e:e + k]))
    for gram, counter in follows.items():
        got = index.continuations(gram, k)
        assert all(tuple(c) in conts[gram] for c in got), gram
        firsts = [c[0] for c in got]
        assert len(set(firsts)) == len(firsts) == min(breadth, len(counter))
        best = sorted(counter.values(), reverse=True)[:breadth]
        assert [counter[t] for t in firsts] == best, (gram, counter, firsts)
    assert index.continuations((9, 9), k) == [] and index.num_tokens == sum(map(len, seqs))


def test_corpus_files_and_their_errors(tmp_path) -> None:
    from sgl.runtime.speculative.ngram_corpus import DEFAULT_CORPUS, corpus_path, load_corpus, read_texts

    assert corpus_path("default", "default") == DEFAULT_CORPUS and DEFAULT_CORPUS.exists()
    with pytest.raises(ValueError, match="default model"):
        corpus_path("default", "/models/llama")
    with pytest.raises(ValueError, match="no such file"):
        corpus_path(str(tmp_path / "missing.jsonl"), "default")
    good = tmp_path / "c.jsonl"
    good.write_text('{"text": "a b"}\n\n{"text": "c"}\n')
    assert read_texts(good) == ["a b", "c"]
    assert load_corpus(good, lambda texts: [[len(t)] for t in texts]) == [[3], [1]]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\n{"txt": "b"}\n')
    with pytest.raises(ValueError, match="line 2"):
        read_texts(bad)
    assert len(read_texts(DEFAULT_CORPUS)) > 1000  # the shipped one: gzip JSON lines

"""Drafts under the request's grammar (runtime/speculative/grammar_walk.py): the walk's masks are the matcher's
after the path, refused tokens leave the matcher unchanged, and `close` puts the matcher back exactly (the
same mask, the same accepted tokens, no error), whatever paths were walked."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from sgl.grammars import GrammarCompiler, Vocabulary
from sgl.kernels.bitmask import allocate_token_bitmask
from sgl.runtime.speculative.grammar_walk import GrammarWalk, grammar_walks, with_forced_text

TOKENS = [b"a", b"b", b"c", b"ab", b"ba", b"1", b"2", b"12", b"x", None]  # id 9 = EOS
EOS = 9
V = len(TOKENS)
IDS = torch.arange(V)


def _compiled():  # noqa: ANN202
    return GrammarCompiler(Vocabulary.from_bytes(TOKENS, eos_token_id=EOS)).compile("regex", "(a|b)+[12]x")


def _mask(m) -> torch.Tensor:  # noqa: ANN001
    out = allocate_token_bitmask(1, V)
    m.fill_bitmask(out, 0)
    return out[0].clone()


def _allowed_by_hand(compiled, path: list[int]) -> list[bool]:  # noqa: ANN001
    m = compiled.matcher()
    for t in path:
        assert m.accept(t)
    word = int(_mask(m)[0])
    return [bool(word >> i & 1) for i in range(V)]


def test_walk_masks_are_the_matchers_after_the_path_and_close_puts_it_back() -> None:
    compiled = _compiled()
    g = compiled.matcher()
    assert g.accept(0)  # "a"
    before = _mask(g)
    w = GrammarWalk(g)
    assert w.allowed(IDS).tolist() == _allowed_by_hand(compiled, [0])
    assert w.goto([3, 5])  # "ab" "1"
    assert w.allowed(IDS).tolist() == _allowed_by_hand(compiled, [0, 3, 5])
    assert w.goto([3, 6])  # back to the common prefix "ab", then "2"
    assert w.path == [3, 6] and w.allowed(IDS).tolist() == _allowed_by_hand(compiled, [0, 3, 6])
    assert not w.goto([1, 8])  # "b" then "x": "x" is refused after "ab"; the walk stands on "b"
    assert w.path == [1] and g.error is None
    assert not w.take(2)  # "c" is never allowed: refused, the matcher unchanged and not in error
    assert g.error is None and w.allowed(IDS).tolist() == _allowed_by_hand(compiled, [0, 1])
    w.close()
    assert torch.equal(_mask(g), before) and g.error is None
    for t in [3, 5, 8]:  # the matcher continues from "a" for real
        assert g.accept(t)


def test_masked_scores_and_a_node_with_nothing_allowed() -> None:
    g = _compiled().matcher()
    w = GrammarWalk(g)
    scores = torch.arange(V, dtype=torch.float32)
    masked = w.masked(scores, IDS)
    assert masked is not None
    want = torch.tensor(_allowed_by_hand(_compiled(), []))
    assert torch.equal(masked == float("-inf"), ~want) and int(masked.argmax()) == 4  # "ba": the best allowed
    assert w.masked(scores[5:7], IDS[5:7]) is None  # "1" and "2" cannot come first
    w.close()
    assert g.error is None and g.accept(0)


def test_a_walk_ends_at_eos_and_closes_back_over_it() -> None:
    """Nothing follows EOS in a draft (verification samples nothing after it), and closing a walk through EOS
    puts the matcher back on the tokens before it."""
    g = _compiled().matcher()
    for t in [0, 5]:  # "a" "1"
        assert g.accept(t)
    before = _mask(g)
    w = GrammarWalk(g)
    assert w.take(8) and w.take(EOS)  # "x", EOS
    assert not w.take(EOS) and w.path == [8, EOS]
    w.close()
    assert torch.equal(_mask(g), before) and g.error is None
    assert g.accept(8) and g.accept(EOS) and g.is_finished()


def test_only_live_sgl_matchers_get_a_walk() -> None:
    compiled = _compiled()
    failed = compiled.matcher()
    assert not failed.accept(8)  # "x" first: the error state
    reqs = [SimpleNamespace(grammar=compiled.matcher()), SimpleNamespace(grammar=None),
            SimpleNamespace(grammar=failed), SimpleNamespace(grammar=object())]
    with grammar_walks(reqs) as walks:
        assert isinstance(walks[0], GrammarWalk) and walks[1:] == [None, None, None]
        assert walks[0].goto([0, 3])  # "a" "ab"
    assert reqs[0].grammar.accept(8) is False  # closed on leaving the block: back at the start, where "x" is refused


def test_chain_drafts_hold_the_forced_text_whole() -> None:
    """After "1" the grammar forces "x" (jump-forward's text): a draft holding it is kept, one ending inside it or
    going elsewhere gets it instead of its rest, one without room for it ends before it, a forbidden token ends
    the draft; the matcher is put back."""
    g = _compiled().matcher()
    assert g.accept(0)  # "a"
    before = _mask(g)
    assert with_forced_text(g, [5, 8, EOS], 9) == [5, 8, EOS]  # "1" "x" EOS: holds it
    assert with_forced_text(g, [5], 9) == [5, 8]  # ends where "x" is forced: completed
    assert with_forced_text(g, [5, 2, 0], 9) == [5, 8]  # "c" after "1": the rest replaced by "x"
    assert with_forced_text(g, [5], 1) == [5]  # no room for "x": ends before it
    assert with_forced_text(g, [3, 8, 1], 9) == [3]  # "ab" then "x": forbidden there
    assert torch.equal(_mask(g), before) and g.error is None and g.accept(6)

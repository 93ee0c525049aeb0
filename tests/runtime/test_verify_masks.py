"""Grammar masks along a draft (runtime/executor/verify.py): position p's mask equals the mask after
accepting d_1..d_p for real, the draft is cut at the first token the grammar forbids, and the matcher
ends where it started (no token accepted, no error)."""

from __future__ import annotations

import torch

from sgl.grammars import GrammarCompiler, Vocabulary
from sgl.kernels.bitmask import allocate_token_bitmask
from sgl.runtime.executor.verify import fill_verify_bitmask

TOKENS = [b"a", b"b", b"c", b"ab", b"ba", b"1", b"2", b"12", b"x", None]  # id 9 = EOS
EOS = 9
V = len(TOKENS)


def _matcher():  # noqa: ANN202
    vocab = Vocabulary.from_bytes(TOKENS, eos_token_id=EOS)
    return GrammarCompiler(vocab).compile("regex", "(a|b)+[12]x")


def _masks_by_hand(compiled, prefix: list[int], draft: list[int]) -> list[torch.Tensor]:
    m = compiled.matcher()
    for t in prefix:
        assert m.accept(t)
    out = []
    for t in [None] + draft:
        if t is not None:
            assert m.accept(t)
        mask = allocate_token_bitmask(1, V)
        m.fill_bitmask(mask, 0)
        out.append(mask[0].clone())
    return out


def test_masks_along_a_valid_draft_then_cut_at_forbidden_token() -> None:
    compiled = _matcher()
    g = compiled.matcher()
    assert g.accept(0)  # "a"
    draft = [3, 5, 8, 2]  # "ab" "1" "x" then "c": forbidden after the regex completed
    other = None  # an unconstrained row in the same batch
    vm = fill_verify_bitmask([other, g], [0, 5], [[1, 1, 1, 1, 1], draft], 10, V)
    assert vm.alive == [None, [True, True, True, False]]
    want = _masks_by_hand(compiled, [0], [3, 5, 8])
    for p, m in enumerate(want):
        assert torch.equal(vm.bitmask[5 + p], m), p
    assert bool((vm.bitmask[:5] == -1).all())  # the unconstrained row: everything allowed
    assert g.error is None
    # The matcher is where it was: it accepts the same continuation for real.
    for t in [3, 5, 8]:
        assert g.accept(t)
    assert g.is_finished() or g.accept(EOS)


def test_first_draft_forbidden_gives_empty_draft() -> None:
    compiled = _matcher()
    g = compiled.matcher()
    vm = fill_verify_bitmask([g], [0], [[5, 0]], 3, V)  # "1" cannot come first
    assert vm.alive == [[False, False]]
    assert g.error is None and g.accept(0)


def test_tree_nodes_the_grammar_forbids_are_cut_with_their_subtrees() -> None:
    compiled = _matcher()
    g = compiled.matcher()
    assert g.accept(0)  # "a"
    # pending -> 3 ("ab") -> {5 ("1") -> 8 ("x"), 2 ("c": forbidden) -> 5}; pending -> 8 (forbidden) -> 3
    draft, parents = [3, 5, 2, 8, 5, 8, 3], [-1, 0, 0, 1, 2, -1, 5]
    vm = fill_verify_bitmask([g], [0], [draft], 1 + len(draft), V, parents=[parents])
    assert vm.alive == [[True, True, False, True, False, False, False]]
    want = _masks_by_hand(compiled, [0], [3, 5, 8])
    for node, m in zip([-1, 0, 1, 3], want):
        assert torch.equal(vm.bitmask[1 + node], m), node
    assert g.error is None
    for t in [3, 5, 8]:
        assert g.accept(t)


def test_forced_text_is_taken_as_jump_forward_appends_it() -> None:
    """After "1" the grammar forces "x": the walk records it per node, and sampling takes it from the draft
    without a draw (logprob 0, not in the sampling state), then samples on; with "x" not drafted (a leaf at
    "1", or another token after it) the row stops at "1" (the scheduler's jump-forward appends "x")."""
    from sgl.runtime.executor.sampling_state import RowSamplingState
    from sgl.runtime.executor.verify import sample_verify
    from sgl.runtime.protocol import SamplingParams

    compiled = _matcher()
    g = compiled.matcher()
    assert g.accept(0)  # "a"
    drafts = [[5, 8], [5], [5, 2]]  # "1" "x" / "1" (a leaf) / "1" "c"
    vm = fill_verify_bitmask([g, g, g], [0, 3, 5], drafts, 8, V)
    assert vm.forced == [[[8], []], [[8]], [[8], []]]
    logits = torch.zeros(8, V)
    logits[:, 5] = 5.0  # the model likes "1"; after "x" only EOS is allowed
    for params in (SamplingParams(temperature=0), SamplingParams(temperature=0.7, sampling_seed=3)):
        states = [RowSamplingState.create(params, [0], frozenset({EOS})) for _ in drafts]
        outs = sample_verify(logits, [0, 3, 5], drafts, states, vm.bitmask, [0, 0, 0], alive=vm.alive,
                             want_logprobs=[True] * 3, forced=vm.forced)
        assert [o.token_ids for o in outs] == [[5, 8, EOS], [5], [5]]
        assert outs[0].logprobs[1] == 0.0 and outs[0].path == [0, 1]
        assert [s.output_ids for s in states] == [[5, EOS], [5], [5]]  # "x" was not sampled
    assert g.error is None and g.accept(5) and g.accept(8)

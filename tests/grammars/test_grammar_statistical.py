"""Constrained sampling has the right DISTRIBUTION (as outlines-core's test_statistical.py): with
temperature 1, a toy model's next-token samples under a grammar mask follow softmax(logits) restricted
to the allowed tokens and renormalized. Chi-square test on a hand-made vocabulary."""
from __future__ import annotations

import pytest
import torch
from scipy.stats import chisquare

from sgl.grammars import GrammarCompiler, Vocabulary
from sgl.kernels.bitmask import allocate_token_bitmask, apply_token_bitmask_

pytestmark = pytest.mark.timeout(120)

TOKENS = [b"a", b"b", b"c", b"ab", b"ba", b"1", b"2", b"12", b"x", None]  # id 9 = EOS
EOS = 9


def toy_logits(prefix: list[int], generator: torch.Generator) -> torch.Tensor:
    """A fixed 'model': logits depend on the prefix length only."""
    g = torch.Generator().manual_seed(1000 + len(prefix))
    return torch.randn(len(TOKENS), generator=g) * 1.5


def test_masked_renormalized_distribution():
    vocab = Vocabulary.from_bytes(TOKENS, eos_token_id=EOS)
    g = GrammarCompiler(vocab).compile("regex", "(a|b)+[12]")
    m = g.matcher()
    assert m.accept(0)  # "a"
    mask = allocate_token_bitmask(1, len(TOKENS))
    m.fill_bitmask(mask, 0)
    logits = toy_logits([0], torch.Generator()).unsqueeze(0)  # [1, V]
    masked = logits.clone()
    apply_token_bitmask_(masked, mask)
    allowed = masked[0].isfinite().nonzero().flatten().tolist()
    assert sorted(allowed) == [0, 1, 3, 4, 5, 6]  # a b ab ba 1 2 (not c, 12, x, EOS)
    expected = torch.softmax(logits[0, allowed].double(), dim=0)  # renormalized over the allowed tokens
    n = 20000
    gen = torch.Generator().manual_seed(0)
    samples = torch.multinomial(torch.softmax(masked[0], dim=0), n, replacement=True, generator=gen)
    counts = torch.bincount(samples, minlength=len(TOKENS))
    assert counts[[2, 8, 9]].sum() == 0  # never a disallowed token
    stat = chisquare(counts[allowed].double().numpy(), (expected * n).numpy())
    assert stat.pvalue > 1e-3, stat


def test_sequences_distribution_two_steps():
    """Whole-sequence probabilities under a choices grammar: P(seq) = product of renormalized steps."""
    vocab = Vocabulary.from_bytes(TOKENS, eos_token_id=EOS)
    g = GrammarCompiler(vocab).compile("choices", ["ab", "ba", "a1"])
    gen = torch.Generator().manual_seed(1)
    counts: dict[bytes, int] = {}
    n = 3000
    for _ in range(n):
        m, out = g.matcher(), []
        while True:
            mask = allocate_token_bitmask(1, len(TOKENS))
            m.fill_bitmask(mask, 0)
            logits = toy_logits(out, gen).unsqueeze(0)
            apply_token_bitmask_(logits, mask)
            t = int(torch.multinomial(torch.softmax(logits[0], 0), 1, generator=gen))
            assert m.accept(t), m.error
            if t == EOS:
                break
            out.append(t)
        text = vocab.decode(out)
        counts[text] = counts.get(text, 0) + 1
    assert set(counts) <= {b"ab", b"ba", b"a1"}

    def p_seq(ids_paths: list[list[int]]) -> float:
        return sum(_path_prob(g, p) for p in ids_paths)

    paths = {b"ab": [[3], [0, 1]], b"ba": [[4], [1, 0]], b"a1": [[0, 5]]}
    exp = {k: p_seq(v) for k, v in paths.items()}
    total = sum(exp.values())
    keys = sorted(paths)
    stat = chisquare([counts.get(k, 0) for k in keys], [exp[k] / total * n for k in keys])
    assert stat.pvalue > 1e-3, (counts, exp)


def _path_prob(g, ids: list[int]) -> float:
    """Probability of emitting exactly `ids` then EOS under the masked-renormalized sampler."""
    m, p, prefix = g.matcher(), 1.0, []
    for t in ids + [EOS]:
        mask = allocate_token_bitmask(1, len(TOKENS))
        m.fill_bitmask(mask, 0)
        logits = toy_logits(prefix, torch.Generator()).unsqueeze(0)
        apply_token_bitmask_(logits, mask)
        p *= float(torch.softmax(logits[0], 0)[t])
        assert m.accept(t)
        prefix.append(t)
    return p

"""The runtime-facing contract: compile_async/cache/timeout, fill_bitmask/accept/rollback/is_finished,
jump-forward, the error state, EOS and padding, on every installed backend."""
from __future__ import annotations

import json
import time
from concurrent.futures import Future

import pytest
import torch

from sgl.grammars import GrammarCompiler, GrammarError, GrammarTimeout, Vocabulary
from sgl.grammars.base import CompiledGrammar, GrammarBackend, GrammarSpec, register_backend
from sgl.kernels.bitmask import allocate_token_bitmask, apply_token_bitmask_, unpack_token_bitmask

from .conftest import BACKENDS, compiler_for
from .grammar_testlib import walk

pytestmark = pytest.mark.timeout(120)


def allowed(vocab: Vocabulary, m) -> list[int]:
    mask = allocate_token_bitmask(1, vocab.vocab_size_padded)
    m.fill_bitmask(mask, 0)
    return unpack_token_bitmask(mask, vocab.vocab_size_padded)[0].nonzero().flatten().tolist()


@pytest.mark.parametrize("backend", BACKENDS)
def test_regex_choices_json_each_backend(vocab, backend):
    c = compiler_for(vocab, backend)
    g = c.compile("regex", r"[0-9]{1,3}-(ab|cd)")
    assert walk(g, vocab, "12-ab") and walk(g, vocab, "999-cd")
    assert not walk(g, vocab, "1234-ab") and not walk(g, vocab, "12-ac")
    g = c.compile("choices", ["yes", "no", "maybe (later)"])
    assert walk(g, vocab, "maybe (later)") and walk(g, vocab, "no") and not walk(g, vocab, "nope")
    g = c.compile("json_schema", {"type": "object", "properties": {"a": {"type": "integer"},
                                                                   "b": {"enum": ["x", "y"]}}, "required": ["a"]})
    assert walk(g, vocab, '{"a":12,"b":"x"}') and walk(g, vocab, '{"a":-3}')
    assert not walk(g, vocab, '{"a":12,"b":"z"}') and not walk(g, vocab, '{"b":"x"}')


@pytest.mark.parametrize("backend", ["llguidance", "xgrammar"])
def test_ebnf(vocab, backend):
    c = compiler_for(vocab, backend)
    gbnf = 'root ::= "(" expr ")"\nexpr ::= [0-9]+ ("+" [0-9]+)*'
    g = c.compile("ebnf", gbnf)
    assert walk(g, vocab, "(1+22+3)") and not walk(g, vocab, "(1+)")
    if backend == "llguidance":  # Lark's dialect too
        g = c.compile("ebnf", 'start: "(" expr ")"\nexpr: NUM ("+" NUM)*\nNUM: /[0-9]+/')
        assert walk(g, vocab, "(1+22+3)") and not walk(g, vocab, "(1+)")


def test_bad_constraints_raise_at_validate(compiler):
    for kind, value in [("regex", "(unclosed"), ("ebnf", "start: (("), ("choices", []), ("choices", "abc"),
                        ("regexp", "x"), ("json_schema", "[1,2]")]:
        with pytest.raises(GrammarError):
            compiler.validate(kind, value)
    fut = compiler.compile_async("regex", "(unclosed")
    with pytest.raises(GrammarError):
        fut.result(10)


def test_mask_eos_and_padding(vocab, compiler):
    m = compiler.compile("regex", "ab?").matcher()
    ids = allowed(vocab, m)
    assert all(vocab.decode([i]).startswith(b"a") for i in ids) and vocab.eos_token_id not in ids
    assert all(i < vocab.vocab_size for i in ids)  # padding ids are never allowed
    assert m.accept(vocab.encode(b"a")[0]) and not m.is_finished()
    ids = allowed(vocab, m)
    assert vocab.eos_token_id in ids and vocab.encode(b"b")[0] in ids
    assert m.accept(vocab.encode(b"b")[0])
    assert m.is_finished()  # complete: only EOS may follow
    assert allowed(vocab, m) == [vocab.eos_token_id]
    assert m.accept(vocab.eos_token_id) and m.is_finished() and m.error is None


def test_wider_bitmask_row_is_zeroed_past_vocab(vocab, compiler):
    m = compiler.compile("regex", "a").matcher()
    mask = torch.full((3, (vocab.vocab_size_padded + 31) // 32 + 5), -1, dtype=torch.int32)
    m.fill_bitmask(mask, 1)
    assert (mask[1, -5:] == 0).all() and (mask[0] == -1).all() and (mask[2] == -1).all()


def test_rollback(vocab, compiler):
    m = compiler.compile("regex", "abc|abd").matcher()
    ids = vocab.encode(b"a") + vocab.encode(b"b") + vocab.encode(b"c")
    before = allowed(vocab, m)
    for t in ids:
        assert m.accept(t)
    assert m.is_finished()
    m.rollback(3)
    assert allowed(vocab, m) == before and not m.is_finished()
    for t in vocab.encode(b"a") + vocab.encode(b"b") + vocab.encode(b"d"):
        assert m.accept(t)
    assert m.is_finished()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pattern,text", [("abc|abd", b"abc"), ("(ab)+", b"abab")])
def test_rollback_through_eos(vocab, backend, pattern, text):
    """EOS accepted after a complete match (where a backend may already have stopped on its own, as llguidance
    does once nothing can follow) is one token to roll back like any other: speculative drafts walk through it."""
    m = compiler_for(vocab, backend).compile("regex", pattern).matcher()
    ids = vocab.encode(text)
    for t in ids:
        assert m.accept(t)
    eos = min(vocab.eos_token_ids)
    for n in (1, 2):  # EOS alone, then EOS and the token before it
        before = allowed(vocab, m)
        assert m.accept(eos) and m.is_finished()
        m.rollback(n)
        if n == 2:
            assert m.accept(ids[-1]), backend
        assert allowed(vocab, m) == before and m.error is None, (backend, n)
    assert m.accept(eos) and m.is_finished()


@pytest.mark.parametrize("backend", BACKENDS)
def test_rollback_over_repeated_eos(vocab, backend):
    """After EOS only EOS is allowed, so a walk along a draft may take EOS several times (EAGLE drafted "false }
    EOS EOS"); rolling all of them back must undo the real tokens once: one token too many undid the forced text
    before them, and the request then sampled '":' after '"active":' (invalid JSON)."""
    m = compiler_for(vocab, backend).compile("regex", "ab(c|d)").matcher()
    ids = vocab.encode(b"ab")
    for t in ids:
        assert m.accept(t)
    before = allowed(vocab, m)
    c = vocab.encode(b"c")[0]
    eos = min(vocab.eos_token_ids)
    assert m.accept(c) and m.accept(eos) and m.accept(eos) and m.accept(eos)
    m.rollback(4)
    assert allowed(vocab, m) == before and m.error is None, backend
    assert m.accept(vocab.encode(b"d")[0]) and m.accept(eos) and m.is_finished()


def test_error_state_never_raises(vocab, compiler):
    m = compiler.compile("regex", "[0-9]+").matcher()
    assert not m.accept(vocab.encode(b"x")[0])
    assert m.error and "not allowed" in m.error
    assert not m.accept(vocab.encode(b"1")[0])  # stays in the error state
    assert allowed(vocab, m) == [vocab.eos_token_id]  # only EOS, so the row can end
    m.rollback(1)
    assert m.jump_forward() is None and m.jump_forward_tokens() == [] and not m.is_finished()


def test_jump_forward_fixed_keys(vocab, compiler):
    s = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
         "required": ["name", "age"], "additionalProperties": False}
    m = compiler.compile("json_schema", s).matcher()
    forced = m.jump_forward_tokens()
    text = vocab.decode(forced).decode()
    assert text and '{"name":"'.startswith(text), text
    assert m.jump_forward() == text
    for t in forced:
        assert m.accept(t)
    for t in vocab.encode(text_rest := '{"name":"Bo"'[len(text):].encode()):
        assert m.accept(t), text_rest
    forced = vocab.decode(m.jump_forward_tokens()).decode()
    assert forced and ',"age":'.startswith(forced), forced
    # choices with one common prefix
    m = compiler.compile("choices", ["internationalization", "internationalize"]).matcher()
    assert "internationali".startswith(m.jump_forward() or "")


def test_compile_async_cache_and_shared_future(vocab, compiler):
    c = GrammarCompiler(vocab, cache_size=2)
    f1 = c.compile_async("regex", "[a-z]{3}")
    f2 = c.compile_async("regex", "[a-z]{3}")
    assert isinstance(f1, Future) and f1 is f2
    g = f1.result(10)
    assert isinstance(g, CompiledGrammar) and g.compile_time_s >= 0
    c.compile("regex", "x")
    c.compile("regex", "y")  # evicts the LRU entry
    assert c.cache_len() == 2 and c.compile_async("regex", "[a-z]{3}") is not f1
    # matchers from one compiled grammar are independent
    m1, m2 = g.matcher(), g.matcher()
    assert m1.accept(vocab.encode(b"a")[0]) and not m2.is_finished()
    c.shutdown()


class _SlowBackend(GrammarBackend):
    name = "slow-test"

    def compile(self, spec: GrammarSpec) -> CompiledGrammar:
        time.sleep(1.0)
        raise AssertionError("never reached in time")


def test_compile_timeout(vocab):
    register_backend("slow-test", _SlowBackend)
    c = GrammarCompiler(vocab, backend="slow-test", compile_timeout_s=0.2)
    t0 = time.perf_counter()
    with pytest.raises(GrammarTimeout):
        c.compile_async("regex", "a").result(5)
    assert time.perf_counter() - t0 < 0.9
    c.shutdown()


def test_mixed_batch_masks(vocab, compiler):
    """Rows with different grammars and an unconstrained row in one bitmask, applied to one logits
    tensor: each row's finite logits are exactly its grammar's allowed tokens."""
    V = vocab.vocab_size_padded
    grammars = [compiler.compile("regex", "[0-9]+"), None, compiler.compile("choices", ["yes", "no"]),
                compiler.compile("json_schema", json.dumps({"type": "array", "items": {"type": "boolean"}}))]
    matchers = [g.matcher() if g else None for g in grammars]
    mask = allocate_token_bitmask(len(matchers), V)
    for i, m in enumerate(matchers):
        if m is not None:
            m.fill_bitmask(mask, i)
    logits = torch.randn(len(matchers), V)
    apply_token_bitmask_(logits, mask, indices=[i for i, m in enumerate(matchers) if m is not None])
    for i, m in enumerate(matchers):
        finite = logits[i].isfinite().nonzero().flatten().tolist()
        if m is None:
            assert len(finite) == V
        else:
            assert finite == allowed(vocab, m)
    digits = {vocab.decode([t]) for t in logits[0].isfinite().nonzero().flatten().tolist()}
    assert digits and all(d.isdigit() for d in digits)
    first = {vocab.decode([t]) for t in logits[3].isfinite().nonzero().flatten().tolist()}
    assert first == {b"["} or all(f.startswith(b"[") for f in first)


def test_vocabulary_bytes(tokenizer, vocab):
    tok, eos = tokenizer
    for text in ['{"name": "Zoë", "emoji": "🙂"}\n', "  \t x", "日本語のテキスト"]:
        ids = tok.encode(text, add_special_tokens=False).ids
        assert vocab.decode(ids) == text.encode("utf-8")
    assert vocab.token_bytes[vocab.eos_token_id] is None and vocab.eos_token_ids == eos
    assert vocab.vocab_size == 49152 and vocab.vocab_size_padded == 49152 + 64
    im_start = tok.token_to_id("<|im_start|>")
    assert vocab.token_bytes[im_start] is None and im_start in vocab.special_token_ids
    assert vocab.encode(b"<|im_start|>") != [im_start]  # literal text never becomes a special token


def test_vocabulary_sentencepiece_byte_fallback():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    pieces = ["<unk>", "</s>", "<0x0A>", "<0xC3>", "<0xA9>", "\u2581hello", "\u2581", "a"]
    tok = Tokenizer(models.BPE(vocab={p: i for i, p in enumerate(pieces)}, merges=[], byte_fallback=True,
                               unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens(["</s>"])
    v = Vocabulary.from_tokenizer(tok, frozenset({1}), None)
    assert v.token_bytes[2] == b"\n" and v.token_bytes[3] == b"\xc3" and v.token_bytes[5] == b" hello"
    assert v.token_bytes[1] is None and v.decode([3, 4]).decode() == "é"


def test_unsatisfiable_mid_generation_is_an_error_state(vocab, compiler):
    """Byte 0x04 is in no token of this vocabulary: after "a" nothing can follow."""
    m = compiler.compile("regex", "a\\x04").matcher()
    assert m.accept(vocab.encode(b"a")[0])
    assert allowed(vocab, m) == [vocab.eos_token_id] and "unsatisfiable" in (m.error or "")
    assert not m.accept(vocab.eos_token_id)


@pytest.mark.parametrize("backend", BACKENDS)
def test_initial_mask_is_shared_and_exact(vocab, backend):
    """A grammar's first mask is computed once, at compile time, and copied by every matcher; it equals the mask a
    fresh backend matcher computes, and a matcher rolled back to the start gets it again."""
    c = compiler_for(vocab, backend)
    g = c.compile("json_schema", {"type": "object", "properties": {"name": {"type": "string"}}})
    assert g._initial.words is not None  # computed by the compile thread (warm), before any request
    first = allowed(vocab, g.matcher())
    fresh = g._new_matcher()  # no shared slot: computes the mask itself
    assert allowed(vocab, fresh) == first
    m = g.matcher()
    assert allowed(vocab, m) == first
    assert m.accept(vocab.encode(b"{")[0])
    after = allowed(vocab, m)
    assert after != first
    m.rollback(1)
    assert allowed(vocab, m) == first


@pytest.mark.parametrize("backend", BACKENDS)
def test_head_masks_are_shared_and_exact(vocab, backend):
    """The masks after the first few tokens are kept per grammar and copied by later matchers with the same
    prefix: each equals what a fresh backend matcher computes, along two prefixes and after a rollback."""
    c = compiler_for(vocab, backend)
    g = c.compile("json_schema", {"type": "object", "properties": {"name": {"type": "string"}, "n": {"type": "integer"}}})
    for text in (b'{"name":"ab"}', b'{"n":12}', b'{"name":"ab"}'):
        toks = vocab.encode(text)
        m, fresh = g.matcher(), g._new_matcher()  # fresh: no shared slot, computes every mask itself
        for i, t in enumerate(toks[:5]):
            assert allowed(vocab, m) == allowed(vocab, fresh), (text, i)
            assert m.accept(t) and fresh.accept(t)
        m.rollback(3)
        fresh.rollback(3)
        assert allowed(vocab, m) == allowed(vocab, fresh)
    assert 0 < len(g._initial.heads) <= 16

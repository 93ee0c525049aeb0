"""TokenTable (grammars/token_table.py): the vocabulary's bytes in one blob, read like the tuple it replaced,
and what the grammar compiler holds in Python objects per token (one `bytes` each before: ~2.6 MB)."""
from __future__ import annotations

import gc
import tracemalloc

from sgl.grammars import GrammarCompiler, Vocabulary
from sgl.grammars.token_table import TokenTable


def test_reads_like_a_tuple() -> None:
    items = [b"a", None, b"", b" {\"", None, "é".encode(), b"\xff"]
    t = TokenTable(items)
    assert len(t) == len(items) and list(t) == items and [t[i] for i in range(len(items))] == items
    assert t[-1] == b"\xff" and t[1:4] == items[1:4] and t == items and t == TokenTable(items)
    assert t != TokenTable(items[:-1] + [b"\xfe"]) and hash(t) == hash(TokenTable(items))
    assert t.join([0, 1, 3, 99, 5]) == b'a {"' + "é".encode()  # None and ids past the end: nothing
    for bad in (len(items), -len(items) - 1):
        try:
            t[bad]
        except IndexError:
            pass
        else:
            raise AssertionError(f"t[{bad}] must raise IndexError, as a tuple's")


def _python_bytes(build) -> tuple[object, int]:
    gc.collect()
    tracemalloc.start()
    try:
        out = build()
        gc.collect()
        return out, tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()


def test_vocabulary_and_compiler_hold_no_object_per_token(tokenizer) -> None:
    tok, eos = tokenizer
    vocab, held = _python_bytes(lambda: Vocabulary.from_tokenizer(tok, eos, vocab_size_padded=49152))
    # a bytes object per token was 2.2 MB for these 49,152 tokens; the blob, its offsets and flags ~0.5
    assert held < 1 << 20, held
    assert vocab.token_bytes[tok.token_to_id("Ġ{")] == b" {"
    compiler, held = _python_bytes(lambda: GrammarCompiler(vocab, num_threads=1))
    # llguidance's copy: its token list (one new bytes object per token now) is dropped once read
    assert held < 256 << 10, held
    assert compiler.compile("regex", "[0-9]{3}").matcher() is not None
    compiler.shutdown()

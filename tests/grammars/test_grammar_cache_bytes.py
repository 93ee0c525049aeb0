"""The compiled-grammar cache is bounded in (estimated) bytes: least recently used grammars go first,
a grammar over the bound alone is served but not kept, and the bytes never exceed the bound."""
from __future__ import annotations

from sgl.grammars.compiler import GrammarCompiler, estimate_grammar_bytes


def test_estimate_grows_with_the_grammar(vocab) -> None:
    c = GrammarCompiler(vocab, num_threads=1)
    small = estimate_grammar_bytes(c.compile("regex", "[a-z]{3}"), vocab.vocab_size)
    big = estimate_grammar_bytes(c.compile("regex", "|".join(f"word{i}" for i in range(300))), vocab.vocab_size)
    assert 4 * (vocab.vocab_size // 32) < small < big
    assert c.cache_nbytes() == small + big
    c.shutdown()


def test_lru_eviction_by_bytes(vocab) -> None:
    one = estimate_grammar_bytes(GrammarCompiler(vocab, num_threads=1).compile("regex", "a0"), vocab.vocab_size)
    c = GrammarCompiler(vocab, num_threads=1, cache_bytes=3 * one + one // 2)  # room for 3 two-char regexes
    grammars = {src: c.compile("regex", src) for src in ("a0", "a1", "a2")}
    assert c.cache_len() == 3 and c.cache_nbytes() == 3 * one
    assert c.compile("regex", "a0") is grammars["a0"]  # a hit: a0 becomes the most recent
    c.compile("regex", "a3")  # over the bound: the least recently used (a1) goes
    assert c.cache_len() == 3 and c.cache_nbytes() <= c.cache_bytes and c.stats["evicted_for_bytes"] == 1
    assert c.compile("regex", "a0") is grammars["a0"] and c.compile("regex", "a2") is grammars["a2"]
    assert c.compile("regex", "a1") is not grammars["a1"]  # recompiled
    # a grammar bigger than the whole bound is compiled and served, but not cached (nor evicts the rest)
    huge_src = "|".join(f"alternative{i}" for i in range(400))
    g = c.compile("regex", huge_src)
    m = g.matcher()
    assert m.accept(vocab.encode(b"alternative7")[0])  # served: a usable matcher
    assert c.cache_nbytes() <= c.cache_bytes and c.compile_async("regex", huge_src).result(10) is not g
    c.shutdown()


def test_bytes_stay_bounded_over_many_distinct_grammars(vocab) -> None:
    c = GrammarCompiler(vocab, num_threads=1, cache_size=10_000, cache_bytes=2 * 1024 * 1024)
    peak = 0
    for i in range(60):
        c.compile("json_schema", {"type": "object", "properties": {f"f{i}": {"type": "string", "maxLength": 8}},
                                  "required": [f"f{i}"]})
        peak = max(peak, c.cache_nbytes())
    assert 0 < peak <= c.cache_bytes and c.cache_len() < 60
    c.clear_cache()
    assert c.cache_nbytes() == 0 and c.cache_len() == 0
    c.shutdown()

"""Constrained decoding: regex, JSON Schema, EBNF and choices compiled to per-token bitmasks.

The runtime's whole interface (it never sees a regex or a backend):

    from sgl.grammars import GrammarCompiler, Vocabulary, GrammarError

    # once per tokenizer: token id -> bytes (byte-level BPE via the byte table, SentencePiece <0xAB>,
    # special tokens excluded, ids past the tokenizer up to vocab_size_padded always masked)
    vocab = Vocabulary.from_tokenizer(tokenizer.backend, eos_token_ids=frozenset({2}), vocab_size_padded=49152)

    # once per (tokenizer, backend): LRU cache of compiled grammars shared by all requests
    compiler = GrammarCompiler(vocab, backend="llguidance", json_whitespace="compact",
                               compile_timeout_s=30.0, cache_size=256)

    compiler.validate("json_schema", schema_str)      # at submission; sync, fast; GrammarError -> 400
    fut = compiler.compile_async("json_schema", schema_str)  # Future[CompiledGrammar], background thread;
                                                      # GrammarError / GrammarTimeout as its exception
    m = fut.result().matcher()                        # one per request

    # each decode step, for each constrained row of the batch:
    m.fill_bitmask(bitmask, row)    # bitmask: torch.int32 [B, W], W = ceil(vocab_size_padded / 32);
                                    # bit j of word w set = token 32*w+j allowed; EOS allowed iff the
                                    # grammar can end. Apply with sgl.kernels.bitmask.apply_token_bitmask_.
    ok = m.accept(token_id)         # False: not allowed; the matcher is now in its error state
    m.rollback(n)                   # undo the last n accepted tokens
    m.is_finished()                 # complete and only EOS may follow, or EOS accepted
    m.jump_forward_tokens()         # list[int]: forced tokens, canonically tokenized and safe at the
                                    # boundary; NOT yet accepted: accept() each, then feed them to the
                                    # model in one extend step (jump-forward decoding)
    m.jump_forward()                # str | None: the same forced continuation as TEXT (str, not bytes)
    m.error                         # str | None. Matchers never raise in the serving loop: an invalid
                                    # token, an empty mask or a backend failure sets `error` (then only
                                    # EOS is allowed); the runtime aborts that request with the message.

kinds: "regex" (str), "json_schema" (JSON str or dict; see sgl.grammars.json_schema for the supported
keywords), "ebnf" (Lark EBNF, or GBNF with ``::=`` / ``root``), "choices" (list[str]).

Backends (``--grammar-backend``, lazily imported): "llguidance" (default), "xgrammar", "outlines".
"""
from sgl.grammars.base import (CompiledGrammar, GrammarBackend, GrammarMatcher, GrammarSpec, available_backends,
                               get_backend, register_backend)
from sgl.grammars.compiler import DEFAULT_BACKEND, GrammarCompiler
from sgl.grammars.errors import GrammarError, GrammarTimeout
from sgl.grammars.json_schema import normalize as normalize_json_schema
from sgl.grammars.vocabulary import Vocabulary

__all__ = ["GrammarCompiler", "Vocabulary", "GrammarError", "GrammarTimeout", "CompiledGrammar", "GrammarMatcher",
           "GrammarBackend", "GrammarSpec", "DEFAULT_BACKEND", "available_backends", "get_backend",
           "register_backend", "normalize_json_schema"]

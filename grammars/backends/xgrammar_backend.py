"""xgrammar backend: pushdown automata with a precomputed per-state token cache. Fast masks (median
~us) but a long tail on some states, and (measured, see the issue) it accepts raw control characters
in length-bounded strings. EBNF must be GBNF (``root ::= ...``)."""
from __future__ import annotations


import torch
import xgrammar as xgr

from sgl.grammars.backends.regex_util import choices_regex
from sgl.grammars.base import BackendOptions, CompiledGrammar, GrammarBackend, GrammarMatcher, GrammarSpec
from sgl.grammars.errors import GrammarError
from sgl.grammars.vocabulary import Vocabulary

class XGrammarMatcher(GrammarMatcher):
    def __init__(self, vocab: Vocabulary, m: "xgr.GrammarMatcher"):
        super().__init__(vocab)
        self._m = m

    def _fill(self, row: torch.Tensor) -> None:
        self._m.fill_next_token_bitmask(row.view(1, -1), 0)

    def _accept(self, token_id: int) -> bool:
        return self._m.accept_token(token_id)

    def _rollback(self, n: int) -> None:
        self._m.rollback(n)

    def _is_terminated(self) -> bool:
        return self._m.is_terminated()

    def _forced_tokens(self) -> list[int]:
        s = self._m.find_jump_forward_string()
        if not s or self.vocab.tokenizer is None:
            return []
        toks = self.vocab.encode(s.encode("utf-8"))[:-1]  # NOTE: the last token may merge with what follows
        probe = self._m.fork() if hasattr(self._m, "fork") else None
        if probe is not None:
            for i, t in enumerate(toks):
                if not probe.accept_token(t):
                    return toks[:i]
        return toks


class XGrammarGrammar(CompiledGrammar):
    def __init__(self, spec: GrammarSpec, vocab: Vocabulary, compiled: "xgr.CompiledGrammar"):
        self.spec = spec
        self._vocab = vocab
        self._compiled = compiled

    def _new_matcher(self) -> GrammarMatcher:
        return XGrammarMatcher(self._vocab, xgr.GrammarMatcher(self._compiled))


class XGrammarBackend(GrammarBackend):
    name = "xgrammar"

    def __init__(self, vocab: Vocabulary, options: BackendOptions):
        super().__init__(vocab, options)
        n = vocab.vocab_size_padded
        # NOTE: special and padding ids get empty bytes: xgrammar never allows an empty token.
        encoded = [vocab.token_bytes[i] or b"" if i < vocab.vocab_size else b"" for i in range(n)]
        info = xgr.TokenizerInfo(encoded, xgr.VocabType.RAW, vocab_size=n, stop_token_ids=sorted(vocab.eos_token_ids))
        self._compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)

    def check(self, spec: GrammarSpec) -> None:
        try:
            if spec.kind == "regex":
                xgr.Grammar.from_regex(spec.value)
            elif spec.kind == "ebnf":
                xgr.Grammar.from_ebnf(spec.value)
        except Exception as e:  # noqa: BLE001
            raise GrammarError(f"invalid {spec.kind}: {e}") from e

    def compile(self, spec: GrammarSpec) -> CompiledGrammar:
        try:
            if spec.kind == "regex":
                c = self._compiler.compile_regex(spec.value)
            elif spec.kind == "choices":
                c = self._compiler.compile_regex(choices_regex(spec.value))
            elif spec.kind == "ebnf":
                c = self._compiler.compile_grammar(spec.value)
            elif spec.kind == "json_schema":
                compact = spec.json_whitespace == "compact"
                c = self._compiler.compile_json_schema(
                    spec.value, any_whitespace=not compact, separators=(",", ":") if compact else None,
                    strict_mode=False, max_whitespace_cnt=None if compact else spec.max_whitespace)
            else:
                raise GrammarError(f"unknown constraint kind {spec.kind!r}")
        except GrammarError:
            raise
        except Exception as e:  # noqa: BLE001
            raise GrammarError(f"xgrammar cannot compile this {spec.kind}: {e}") from e
        return XGrammarGrammar(spec, self.vocab, c)

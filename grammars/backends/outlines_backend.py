"""outlines-core backend: a regex DFA x vocabulary index (state -> {token -> next state}), built
eagerly at compile time. Exact and fast per token, but construction explodes on bounded repetition
(``maxLength: 20`` takes minutes), so use it for small regexes. JSON schemas go through OUR normalizer,
then outlines-core's schema -> regex translation. No EBNF (use llguidance)."""
from __future__ import annotations

import torch
from outlines_core import Guide, Index
from outlines_core import Vocabulary as OVocabulary
from outlines_core.json_schema import build_regex_from_schema

from sgl.grammars.backends.regex_util import choices_regex
from sgl.grammars.base import BackendOptions, CompiledGrammar, GrammarBackend, GrammarMatcher, GrammarSpec
from sgl.grammars.errors import GrammarError
from sgl.grammars.vocabulary import Vocabulary

_MAX_ROLLBACK = 64


class OutlinesMatcher(GrammarMatcher):
    def __init__(self, vocab: Vocabulary, guide: Guide):
        super().__init__(vocab)
        self._g = guide
        self._eos = vocab.eos_token_id

    def _fill(self, row: torch.Tensor) -> None:
        row.zero_()
        self._g.write_mask_into(row.data_ptr(), row.numel(), 4)

    def _accept(self, token_id: int) -> bool:
        if token_id in self.vocab.eos_token_ids:
            # outlines-core knows one EOS id, and accepts_tokens() never accepts it: ask the state
            return self._g.is_finished() or self._eos in self._g.get_tokens()
        if not self._g.accepts_tokens([token_id]):
            return False
        self._g.advance(token_id, return_tokens=False)
        return True

    def _rollback(self, n: int) -> None:
        self._g.rollback_state(n)

    def _rollback_eos(self) -> None:
        pass  # EOS never advanced the guide (_accept)

    def _is_terminated(self) -> bool:
        return self._g.is_finished()


class OutlinesGrammar(CompiledGrammar):
    def __init__(self, spec: GrammarSpec, vocab: Vocabulary, index: Index):
        self.spec = spec
        self._vocab = vocab
        self._index = index

    def _new_matcher(self) -> GrammarMatcher:
        return OutlinesMatcher(self._vocab, Guide(self._index, max_rollback=_MAX_ROLLBACK))


def to_regex(spec: GrammarSpec) -> str:
    if spec.kind == "regex":
        return spec.value
    if spec.kind == "choices":
        return choices_regex(spec.value)
    if spec.kind == "json_schema":
        ws = "" if spec.json_whitespace == "compact" else f"[ \\t\\n\\r]{{0,{spec.max_whitespace}}}"
        try:
            return build_regex_from_schema(spec.value, whitespace_pattern=ws)
        except Exception as e:  # noqa: BLE001
            raise GrammarError(f"outlines-core cannot translate this schema: {e}") from e
    raise GrammarError(f"the outlines backend does not support {spec.kind!r} constraints; use --grammar-backend "
                       "llguidance")


class OutlinesBackend(GrammarBackend):
    name = "outlines"

    def __init__(self, vocab: Vocabulary, options: BackendOptions):
        super().__init__(vocab, options)
        groups: dict[bytes, list[int]] = {}
        for i, b in enumerate(vocab.token_bytes):
            if b and i not in vocab.eos_token_ids:
                groups.setdefault(b, []).append(i)
        self._ovocab = OVocabulary(vocab.eos_token_id, groups)

    def check(self, spec: GrammarSpec) -> None:
        import re
        r = to_regex(spec)
        try:
            re.compile(r)
        except re.error as e:
            raise GrammarError(f"invalid regex: {e}") from e

    def compile(self, spec: GrammarSpec) -> CompiledGrammar:
        regex = to_regex(spec)
        try:
            index = Index(regex, self._ovocab)
        except Exception as e:  # noqa: BLE001
            raise GrammarError(f"outlines-core cannot compile this {spec.kind}: {e}") from e
        return OutlinesGrammar(spec, self.vocab, index)

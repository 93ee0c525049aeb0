"""The engine's set-up helpers (runtime/engine_setup.py): the grammar Vocabulary is built once per tokenizer
backend, so an engine reloaded after an LRU unload (whose GGUF tokenizer is shared in process) does not
rebuild it (Gemma 3's 262K tokens: seconds)."""

from __future__ import annotations

import pytest

from sgl.runtime import engine_setup
from sgl.runtime.config import ServerArgs
from sgl.runtime.models.default_model import default_model_path
from sgl.runtime.models.gguf_loader import read_gguf

pytest.importorskip("sgl.grammars")


def test_grammar_vocabulary_is_built_once_per_tokenizer(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine_setup, "_VOCABS", engine_setup.OrderedDict())
    first, again = (read_gguf(default_model_path(), show_progress=False) for _ in range(2))
    assert again.tokenizer.backend is first.tokenizer.backend  # GGUF tokenizers are shared in process
    args = ServerArgs()
    a = engine_setup.make_grammar_compiler(args, first.tokenizer, first.config.vocab_size)
    b = engine_setup.make_grammar_compiler(args, again.tokenizer, first.config.vocab_size)
    assert a is not b and a.vocab is b.vocab
    wider = engine_setup.make_grammar_compiler(args, first.tokenizer, first.config.vocab_size + 64)
    assert wider.vocab is not a.vocab and wider.vocab.vocab_size_padded == first.config.vocab_size + 64
    for c in (a, b, wider):
        c.shutdown()


    class Stub:  # a Vocabulary stand-in: building the real one costs a second each
        @staticmethod
        def from_tokenizer(*args: object) -> object:
            return object()

    for i in range(engine_setup._MAX_VOCABS + 1):  # bounded: the oldest entries go
        engine_setup._vocabulary(Stub, first.tokenizer, i)
    assert len(engine_setup._VOCABS) == engine_setup._MAX_VOCABS

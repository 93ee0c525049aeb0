"""Session fixtures: the default model's real tokenizer (49,152 tokens, byte-level BPE) and one
compiler per backend (backends whose package is missing are skipped)."""
from __future__ import annotations

import importlib.util

import pytest

from sgl.grammars import GrammarCompiler, Vocabulary

from .grammar_testlib import load_default_tokenizer

BACKENDS = ["llguidance", "xgrammar", "outlines"]
_MODULE = {"llguidance": "llguidance", "xgrammar": "xgrammar", "outlines": "outlines_core"}


@pytest.fixture(scope="session")
def tokenizer():
    try:
        return load_default_tokenizer()
    except FileNotFoundError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def vocab(tokenizer) -> Vocabulary:
    tok, eos = tokenizer
    # NOTE: padded past the tokenizer's 49,152 like a model whose logits are wider
    return Vocabulary.from_tokenizer(tok, eos, vocab_size_padded=49152 + 64)


_compilers: dict = {}


def compiler_for(vocab: Vocabulary, backend: str) -> GrammarCompiler:
    if importlib.util.find_spec(_MODULE[backend]) is None:
        pytest.skip(f"{backend} is not installed")
    key = (id(vocab), backend)
    if key not in _compilers:
        _compilers[key] = GrammarCompiler(vocab, backend=backend, compile_timeout_s=20.0, num_threads=1)
    return _compilers[key]


@pytest.fixture(scope="session")
def compiler(vocab) -> GrammarCompiler:
    """The default backend."""
    return compiler_for(vocab, "llguidance")

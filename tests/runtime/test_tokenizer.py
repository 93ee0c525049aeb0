"""The tokenizer rebuilt from GGUF metadata against transformers' own GGUF tokenizer, the chat template
against transformers' apply_chat_template, and the incremental detokenizer against full decodes."""

from __future__ import annotations

import json
import os
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import pre_tokenizers

from sgl.runtime.models.default_model import resolve_model_path
from sgl.runtime.tokenizer import IncrementalDetokenizer, Tokenizer

pytestmark = pytest.mark.timeout(120)

CORPUS = [
    "Hello world", "", " ", "  leading spaces", "trailing   ", "a\n\nb\r\n\tc", "\n\n\n", "   \n   \n",
    "x = [i**2 for i in range(10)]  # squares\n", "def f(a, b):\n    return a+b\n\n\nclass A:\n\tpass\n",
    "int main() { printf(\"%d\\n\", 42); return 0; }", "{\"json\": [1, 2, {\"k\": null, \"v\": 3.5e-7}]}",
    "1234567890 3.14159 1e-5 -42", "0x1F 0b1010 ¹²³ ½ ٣", "I'm can't won't they'll we've he'd SHE'S",
    "naïve café résumé ÅÆØ ß ſ", "日本語のテキスト、中文文本。한국어 텍스트", "مرحبا بالعالم", "Привет мир",
    "emoji 👋🏽 👨‍👩‍👧 🎉🎉", "😀" * 5, "ﬁ ligature Ａ fullwidth \u00a0nbsp\u2003emsp\u200bzwsp",
    "\x00\x01\x7f control", "tab\t\tx", "$$\\frac{a}{b}$$", "https://example.com/a?b=c&d=e#f", "a" * 300,
    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", "<|endoftext|><repo_name>x<file_sep>",
    "<|im_start|", "<|im_start|><|im_start|>", "text<|im_end|>text", "Ġ ĉ Ċ", "</s> <s> [INST]",
]


def _random_corpus(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    alphabet = "ab cd\n\t😀中1 2'sЖ.,!?<|>é\r"
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40))) for _ in range(n)]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.load("default")


@pytest.fixture(scope="module")
def ref():
    """transformers' tokenizer converted from the same GGUF (offline)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    folder, name = os.path.split(resolve_model_path("default"))
    return AutoTokenizer.from_pretrained(folder, gguf_file=name)


@pytest.fixture(scope="module")
def ref_smollm(ref):
    """The same, with SmolLM's digit split put back.

    NOTE: transformers' GGUF conversion gives "smollm" files plain GPT-2 splitting; SmolLM2's own
    tokenizer.json and llama.cpp's "smollm" pre-tokenizer first isolate every digit
    (Digits(individual_digits=True), llama.cpp's "\\p{N}" pass). The two differ only on whitespace
    right before a digit ("  2" is ["ĠĠ", "2"] with the split, ["Ġ", "Ġ", "2"] without)."""
    import copy

    patched = copy.deepcopy(ref)
    patched.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    return patched


# ---- ids ---------------------------------------------------------------------------------------------

def test_ids_match_transformers_gguf_tokenizer(tok, ref_smollm):
    for text in CORPUS + _random_corpus(400):
        assert tok.encode(text) == ref_smollm.encode(text, add_special_tokens=True), repr(text)
        assert tok.encode(text, add_special_tokens=False) == ref_smollm.encode(text, add_special_tokens=False)


def test_ids_match_unpatched_reference_away_from_space_digit(tok, ref):
    import re

    texts = [t for t in CORPUS + _random_corpus(400, seed=1) if not re.search(r"\s\d", t)]
    assert len(texts) > 200
    for text in texts:
        assert tok.encode(text) == ref.encode(text), repr(text)


def test_digits_are_split_like_llama_cpp_smollm(tok):
    ids = tok.encode("  2024")
    assert [tok.id_to_token(i) for i in ids] == ["ĠĠ", "2", "0", "2", "4"]


def test_roundtrip(tok):
    for text in CORPUS + _random_corpus(200, seed=2):
        assert tok.decode(tok.encode(text), skip_special_tokens=False) == text, repr(text)


def test_special_tokens(tok, ref):
    assert tok.vocab_size == len(ref) == 49152
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (ref.bos_token_id, ref.eos_token_id,
                                                                        ref.pad_token_id) == (1, 2, 2)
    assert tok.eos_token_ids == frozenset({2})
    assert tok.special_token_ids == frozenset(range(17))  # <|endoftext|> ... <empty_output>
    assert tok.encode("<|im_start|>") == [1]
    ids = tok.encode("<|im_start|>user\nHi<|im_end|>")
    assert tok.decode(ids) == "user\nHi" == ref.decode(ids, skip_special_tokens=True)
    assert tok.decode(ids, skip_special_tokens=False) == ref.decode(ids, skip_special_tokens=False)
    assert tok.id_to_token(905) == "Ġworld" and tok.id_to_token(10**7) is None
    assert tok.decode([19556, 10**7, 905]) == "Hello world"  # ids past the vocabulary decode to nothing


# ---- chat template -----------------------------------------------------------------------------------

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "日本語で 😀"}],
    [{"role": "user", "content": "x", "name": None}],
]


@pytest.mark.parametrize("chat", CHATS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(tok, ref, chat, add_generation_prompt):
    ours = tok.apply_chat_template(chat, add_generation_prompt=add_generation_prompt)
    theirs = ref.apply_chat_template(chat, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert ours == theirs


def test_continue_final_message_matches_transformers(tok, ref):
    chat = [{"role": "user", "content": "Name a color."}, {"role": "assistant", "content": "The color is"}]
    ours = tok.apply_chat_template(chat, continue_final_message=True)
    theirs = ref.apply_chat_template(chat, tokenize=False, continue_final_message=True)
    assert ours == theirs and ours.endswith("The color is")


def test_template_errors_surface(tok):
    bad = "{{ raise_exception('no system role') }}"
    with pytest.raises(Exception, match="no system role"):
        tok.apply_chat_template([{"role": "user", "content": "x"}], chat_template=bad)
    sandbox_escape = "{{ ''.__class__.__mro__ }}"
    with pytest.raises(Exception):
        tok.apply_chat_template([{"role": "user", "content": "x"}], chat_template=sandbox_escape)


# ---- incremental detokenizer -------------------------------------------------------------------------

def _stream(tok: Tokenizer, ids: list[int], context: list[int], skip: bool) -> list[str]:
    d = IncrementalDetokenizer(tok, skip_special_tokens=skip, context_ids=context)
    full_text = tok.decode(context + ids, skip_special_tokens=skip)[len(tok.decode(context, skip_special_tokens=skip)):]
    pieces = []
    for i in ids:
        pieces.append(d.add(i))
        assert full_text.startswith(d.text)  # never emits something the final text does not have
    pieces.append(d.flush())
    assert "".join(pieces) == d.text == full_text
    assert d.output_ids == ids
    return pieces


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ids=st.lists(st.integers(0, 49151), max_size=24), skip=st.booleans())
def test_incremental_equals_full_decode_on_random_ids(tok, ids, skip):
    _stream(tok, ids, [], skip)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=40), context=st.sampled_from(["", "Hi", "<|im_start|>assistant\n", "日本"]))
def test_incremental_on_real_text(tok, text, context):
    ids = tok.encode(text)
    pieces = _stream(tok, ids, tok.encode(context), skip=False)
    if tok.decode(ids, skip_special_tokens=False) == text:  # NOTE: a few bytes (0x04, 0xF1, ...) have no token
        assert all("\ufffd" not in p for p in pieces if "\ufffd" not in text)  # no broken characters


def test_incremental_holds_back_split_characters(tok):
    ids = tok.encode("Hi 👋")  # the emoji is several byte-level tokens
    d = IncrementalDetokenizer(tok)
    pieces = [d.add(i) for i in ids] + [d.flush()]
    assert "".join(pieces) == "Hi 👋" and pieces.count("") >= 2 and "\ufffd" not in "".join(pieces)


# ---- other sources -----------------------------------------------------------------------------------

def test_from_gguf_reader_and_folder_agree(tok, tmp_path):
    import gguf

    from_reader = Tokenizer.from_gguf(gguf.GGUFReader(resolve_model_path("default")))
    tok.backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|im_start|>", "eos_token": {"content": "<|im_end|>"}, "pad_token": "<|im_end|>",
        "add_bos_token": True, "chat_template": [{"name": "default", "template": tok.chat_template}],
    }))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    from_folder = Tokenizer.from_folder(str(tmp_path))
    for text in CORPUS:
        assert from_reader.encode(text) == tok.encode(text)
        assert from_folder.encode(text) == [1] + tok.encode(text)  # add_bos_token: True
        assert from_folder.encode(text, add_special_tokens=False) == tok.encode(text)
    assert from_folder.chat_template == tok.chat_template
    assert from_folder.eos_token_ids == frozenset({0, 2})


def test_sentencepiece_gguf_matches_transformers():
    """A tiny SentencePiece ("llama") vocabulary with byte fallback, against transformers' conversion."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer

    pieces = list(dict.fromkeys(["▁", *"abcdefghijklmnopqrstuvwxyz", "▁t", "he", "▁the", "▁a", "in", "▁in", "er",
                                 "▁q", "ui", "ck", "▁qui", "▁quick", "ro", "wn", "▁b", "▁bro", "▁brown", "ox",
                                 "▁f", "▁fox", "▁▁", "▁▁▁▁", "ll", "▁he", "▁hell", "▁hello", "or", "ld", "T", "."]))
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    types = [2, 3, 3] + [6] * 256 + [1] * len(pieces)
    scores = [0.0] * 259 + [-float(i) for i in range(len(pieces))]
    ours = Tokenizer.from_gguf({
        "tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.scores": scores,
        "tokenizer.ggml.token_type": types, "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0})
    ref, _ = convert_gguf_tokenizer("llama", {"tokenizer_type": "llama", "tokens": tokens, "scores": scores,
                                              "token_type": types})
    texts = ["the quick brown fox", " leading", "multiple    spaces", "hello world\nhello", "ü ✓ 中 😀",
             "<s>the</s>the", "THE. the.", "", " ", "x  y", "\n"]
    for text in texts:
        ids = ours.encode(text, add_special_tokens=False)
        assert ids == ref.encode(text, add_special_tokens=False).ids, repr(text)
        assert ours.encode(text) == [1] + ids  # llama.cpp adds BOS to SentencePiece models by default
        assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("pre", ["llama-bpe", "qwen2", "tekken", "gpt-4o"])
def test_split_regexes_match_transformers(pre):
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    from sgl.runtime.tokenizer_gguf import byte_level_pre_tokenizer

    theirs = pre_tokenizers.Sequence([
        pre_tokenizers.Split(__import__("tokenizers").Regex(GGUF_PRE_TOKENIZER_SPLITS[pre]), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    ours, _ = byte_level_pre_tokenizer(pre)
    for text in CORPUS + _random_corpus(100, seed=3):
        assert ours.pre_tokenize_str(text) == theirs.pre_tokenize_str(text), repr(text)


@pytest.mark.parametrize("module", ["sgl.runtime.tokenizer", "sgl.runtime.chat_template", "sgl.runtime.tokenizer_gguf",
                                    "sgl.runtime.models.default_model", "sgl.runtime.models.gguf_loader",
                                    "sgl.runtime.models.dequant", "sgl.runtime.models.gguf_file"])
def test_docstring_examples(module):
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(module))
    assert result.failed == 0

"""The Vocabulary's private encoder (grammars/vocabulary.py `private_encoder`): it encodes grammar text like the
model's tokenizer, reads special tokens inside text as plain text, leaves the caller's tokenizer as it was,
and shares the tokenizer's model instead of holding a second copy (~10 MB resident on the default model)."""
from __future__ import annotations

import random

from sgl.grammars.vocabulary import Vocabulary, private_encoder


def _texts() -> list[str]:
    rng = random.Random(0)
    parts = ["a", " ", "{", '"', "é", "<|im_end|>", "<|im_start|>", "0", "12", "\n", "ab", "<", "|", "Ġ", "😀", "\t"]
    fixed = ['{"name": "Marie Curie", "age": 66}', "<|im_end|> hi <|im_start|>user", "<|endoftext|>", "中文 ü"]
    return fixed + ["".join(rng.choice(parts) for _ in range(rng.randrange(1, 24))) for _ in range(500)]


def test_private_encoder_encodes_like_a_json_copy(tokenizer) -> None:
    tok, _ = tokenizer
    copy = type(tok).from_str(tok.to_str())
    copy.encode_special_tokens = True
    enc = private_encoder(tok)
    for text in _texts():
        assert enc.encode(text, add_special_tokens=False).ids == copy.encode(text, add_special_tokens=False).ids, text
    im_end = tok.token_to_id("<|im_end|>")
    assert len(enc.encode("<|im_end|>", add_special_tokens=False).ids) > 1  # plain text in grammar output
    assert tok.encode("<|im_end|>", add_special_tokens=False).ids == [im_end]  # the caller's still parses it
    assert not tok.encode_special_tokens


def test_private_encoder_shares_the_tokenizers_model(tokenizer) -> None:
    tok = type(tokenizer[0]).from_str(tokenizer[0].to_str())  # our own, to change a model setting on
    vocab = Vocabulary.from_tokenizer(tok, tokenizer[1])
    before = vocab.tokenizer.model.ignore_merges
    tok.model.ignore_merges = not before  # seen through the encoder's handle: one model, not a copy
    assert vocab.tokenizer.model.ignore_merges is (not before)

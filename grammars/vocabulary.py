"""Vocabulary: token id -> the BYTES the token stands for. Built once per tokenizer.

Grammars match bytes, never decoded strings: a byte-level BPE token such as ``Ġ{"`` is the bytes
``b' {"'``, and one UTF-8 character may be split over two tokens. Three encodings are understood:

- byte-level BPE (GPT-2, Llama-3, SmolLM): each token string is mapped back through GPT-2's
  byte <-> printable-unicode table (`_BYTE_DECODER`);
- SentencePiece with byte fallback (Llama-2, Mistral): ``<0xAB>`` is the single byte 0xAB and
  ``▁`` is a space;
- anything else: the token string's UTF-8 bytes.

Special tokens (``<|im_end|>``, ...) are excluded: their bytes are ``None`` and no grammar can produce
them. EOS is handled by the grammar (allowed when the grammar can end). Ids in
``[len(tokenizer), vocab_size_padded)`` are padding: always masked.

Example:
    >>> vocab = Vocabulary.from_tokenizer(tok.backend, frozenset({2}), vocab_size_padded=49152)
    >>> vocab.token_bytes[tok.encode(" {", add_special_tokens=False)[0]]
    b' {'
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Optional, Sequence

from sgl.grammars.token_table import TokenTable

_SPM_BYTE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
_SPM_SPACE = "\u2581"  # "▁"


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's printable-unicode char -> byte table (inverse of `bytes_to_unicode`)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def _component_types(component: Any) -> set[str]:
    """Class names inside a tokenizers pre_tokenizer/decoder (which may be a Sequence)."""
    if component is None:
        return set()
    text = repr(component)
    return set(re.findall(r"([A-Za-z]+)\(", text))


def private_encoder(tokenizer: Any) -> Any:
    """A `tokenizers.Tokenizer` that encodes like `tokenizer` but reads special tokens inside text ("<|im_end|>")
    as plain text, never as the special token: grammar text (forced continuations, test instances) must not
    produce special tokens, and the caller's tokenizer (the server's) must keep parsing them.

    NOTE: it shares `tokenizer`'s model (the BPE vocabulary and merges: ~10 MB on a 49K vocabulary) instead of
    copying it through JSON: `tokenizer.model` is a handle on the same Rust object, which only reads it
    (the model sits behind a read-write lock; its word cache has its own lock). Only the added tokens
    are per tokenizer: re-added here and checked to keep their ids (a mismatch falls back to the JSON copy).
    """
    def configured(encoder: Any) -> Any:
        encoder.encode_special_tokens = True
        encoder.no_padding()
        encoder.no_truncation()
        return encoder

    encoder = type(tokenizer)(tokenizer.model)
    for part in ("normalizer", "pre_tokenizer", "post_processor", "decoder"):
        if getattr(tokenizer, part) is not None:
            setattr(encoder, part, getattr(tokenizer, part))
    added = tokenizer.get_added_tokens_decoder()  # id -> AddedToken (its special flag kept)
    encoder.add_tokens([added[i] for i in sorted(added)])
    if all(encoder.token_to_id(t.content) == i for i, t in added.items()) \
            and encoder.get_vocab_size(with_added_tokens=True) == tokenizer.get_vocab_size(with_added_tokens=True):
        return configured(encoder)
    return configured(type(tokenizer).from_str(tokenizer.to_str()))


@dataclass(frozen=True)
class Vocabulary:
    """Token id -> bytes (None for special tokens), the EOS ids and the padded vocabulary size.

    Invariants: ``len(token_bytes) == vocab_size <= vocab_size_padded``; every EOS id < vocab_size.
    """

    token_bytes: TokenTable  # id -> bytes (None: special), one blob (grammars/token_table.py)
    eos_token_ids: frozenset[int]
    vocab_size_padded: int
    special_token_ids: frozenset[int] = frozenset()
    tokenizer: Any = field(default=None, compare=False, repr=False)  # tokenizers.Tokenizer (private copy), for encode()

    def __post_init__(self) -> None:
        assert self.vocab_size <= self.vocab_size_padded, (self.vocab_size, self.vocab_size_padded)
        assert all(0 <= e < self.vocab_size for e in self.eos_token_ids), self.eos_token_ids
        assert self.eos_token_ids, "at least one EOS token id is required"

    @property
    def vocab_size(self) -> int:
        return len(self.token_bytes)

    @property
    def eos_token_id(self) -> int:
        return min(self.eos_token_ids)

    def encode(self, data: bytes) -> list[int]:
        """Canonical token ids for `data` (no special tokens added). Needs a tokenizer."""
        if self.tokenizer is None:
            raise RuntimeError("this Vocabulary has no tokenizer to encode with")
        text = data.decode("utf-8", errors="replace")
        return list(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def decode(self, token_ids: Sequence[int]) -> bytes:
        """Concatenated bytes of `token_ids` (special tokens contribute nothing)."""
        return self.token_bytes.join(token_ids)

    @classmethod
    def from_tokenizer(cls, tokenizer: Any, eos_token_ids: frozenset[int],
                       vocab_size_padded: Optional[int] = None) -> "Vocabulary":
        """Build from a `tokenizers.Tokenizer` (the HF fast tokenizer's backend).

        `eos_token_ids` are the ids that end generation; `vocab_size_padded` is the width of the model's
        logits (None: the tokenizer's size).
        """
        size = tokenizer.get_vocab_size(with_added_tokens=True)
        added = tokenizer.get_added_tokens_decoder()  # id -> AddedToken
        kinds = _component_types(tokenizer.pre_tokenizer) | _component_types(tokenizer.decoder)
        byte_level = "ByteLevel" in kinds
        metaspace = "Metaspace" in kinds or _SPM_SPACE in "".join(
            tokenizer.id_to_token(i) or "" for i in range(min(size, 2000)))
        table = _byte_decoder()
        eos = frozenset(int(e) for e in eos_token_ids)
        special: set[int] = set()
        out: list[Optional[bytes]] = []
        for i in range(size):
            tok = tokenizer.id_to_token(i)
            at = added.get(i)
            if tok is None or i in eos or (at is not None and at.special):  # EOS is the grammar's, not text
                special.add(i)
                out.append(None)
            elif at is not None:  # a non-special added token is literal text, not byte-level encoded
                out.append(at.content.encode("utf-8"))
            elif byte_level and all(c in table for c in tok):
                out.append(bytes(table[c] for c in tok))
            elif (m := _SPM_BYTE.match(tok)) is not None:
                out.append(bytes([int(m.group(1), 16)]))
            elif metaspace:
                out.append(tok.replace(_SPM_SPACE, " ").encode("utf-8"))
            else:
                out.append(tok.encode("utf-8"))
        return cls(token_bytes=TokenTable(out), eos_token_ids=eos, special_token_ids=frozenset(special | eos),
                   vocab_size_padded=max(size, vocab_size_padded or size), tokenizer=private_encoder(tokenizer))

    @classmethod
    def from_bytes(cls, token_bytes: Sequence[Optional[bytes]], eos_token_id: int,
                   vocab_size_padded: Optional[int] = None) -> "Vocabulary":
        """A hand-made vocabulary (tests): the EOS slot's bytes are ignored.

        >>> v = Vocabulary.from_bytes([b"a", b"b", b"ab", None], eos_token_id=3)
        >>> v.decode([2, 0])
        b'aba'
        """
        tb = TokenTable(None if i == eos_token_id else b for i, b in enumerate(token_bytes))
        return cls(token_bytes=tb, eos_token_ids=frozenset({eos_token_id}),
                   special_token_ids=frozenset(i for i, b in enumerate(tb) if b is None),
                   vocab_size_padded=vocab_size_padded or len(tb))

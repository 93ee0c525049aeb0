"""Rebuilding a Hugging Face `tokenizers` tokenizer from a GGUF file's metadata.

A GGUF carries no tokenizer.json: llama.cpp stores the vocabulary (`tokenizer.ggml.tokens`), its
merges, a type per token (1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte) and the
name of the pre-tokenizer (`tokenizer.ggml.pre`), whose split regex lives in llama.cpp's C++
(`llama-vocab.cpp`). We rebuild the same pipeline as the model's original tokenizer.json:

    "gpt2" (byte-level BPE): [normalizer] -> split regex for `pre` -> ByteLevel -> BPE; ByteLevel decoder
    "llama" (SentencePiece BPE): Metaspace("▁") -> BPE with byte fallback `<0xAB>`; merges derived from scores

Control tokens become special added tokens (skipped by `decode(skip_special_tokens=True)`);
user-defined tokens become plain added tokens (always matched whole, as llama.cpp does).
"""

from __future__ import annotations

import logging
import os
from functools import lru_cache
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

logger = logging.getLogger(__name__)

TOKEN_TYPE_NORMAL, TOKEN_TYPE_UNKNOWN, TOKEN_TYPE_CONTROL, TOKEN_TYPE_USER_DEFINED = 1, 2, 3, 4

# Split regexes, as in each family's tokenizer.json (llama.cpp's C++ copies of them are equivalent).
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

_LLAMA3_FAMILY = ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "dbrx", "smaug-bpe",
                  "midm-2.0", "lfm2")
_QWEN2_FAMILY = ("qwen2", "deepseek-r1-qwen", "stablelm2", "megrez", "hunyuan")
_NFC_FAMILY = ("qwen2", "deepseek-r1-qwen")  # their tokenizer.json normalizes to NFC first
# StarCoder-style: every digit is its own pre-token, then GPT-2's regex (SmolLM's tokenizer.json does this).
_DIGITS_FAMILY = ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b")
_GPT2_FAMILY = ("default", "gpt-2", "gpt2", "mpt", "olmo", "jais", "phi-2", "trillion")


def _split_then_bytes(pattern: str) -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])


def byte_level_pre_tokenizer(pre: str) -> tuple[pre_tokenizers.PreTokenizer, bool]:
    """(pre-tokenizer, ignore_merges) for a `tokenizer.ggml.pre` name."""
    if pre in _LLAMA3_FAMILY:
        return _split_then_bytes(_LLAMA3_SPLIT), True  # Llama 3 looks whole words up before merging
    if pre in _QWEN2_FAMILY:
        return _split_then_bytes(_QWEN2_SPLIT), False
    if pre == "tekken":
        return _split_then_bytes(_TEKKEN_SPLIT), False
    if pre in ("gpt-4o", "llama4"):
        return _split_then_bytes(_GPT4O_SPLIT), False
    if pre in _DIGITS_FAMILY:
        return pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]), False
    if pre not in _GPT2_FAMILY:
        logger.warning("unknown GGUF pre-tokenizer %r: splitting text with GPT-2's regex", pre)
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True), False


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map (the alphabet byte-level BPE tokens are spelled in)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    chars = list(printable)
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(printable, map(chr, chars)))


def _vocab(tokens: list[str], keep_as_is: set[int], respell: bool) -> dict[str, int]:
    alphabet = set(bytes_to_unicode().values())
    spelling = bytes_to_unicode()
    vocab: dict[str, int] = {}
    for i, token in enumerate(tokens):
        if respell and i not in keep_as_is and not set(token) <= alphabet:
            # A normal token outside the byte alphabet: spell its UTF-8 bytes (as transformers does).
            token = "".join(spelling[b] for b in token.encode("utf-8"))
        if token in vocab:
            logger.warning("GGUF vocabulary repeats token %r (ids %d and %d); keeping the first", token, vocab[token], i)
            continue
        vocab[token] = i
    return vocab


def sentencepiece_merges(vocab: dict[str, int], scores: list[float], tokens: list[str]) -> list[tuple[str, str]]:
    """Merges implied by a SentencePiece vocabulary: every split of a token into two vocabulary tokens,
    best score first (the same order as transformers' `generate_merges`)."""
    merges = []
    for token, score in zip(tokens, scores):
        local = [(token[:k], token[k:], score) for k in range(1, len(token))
                 if token[:k] in vocab and token[k:] in vocab]
        local.sort(key=lambda m: (vocab[m[0]], vocab[m[1]]))
        merges.extend(local)
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(a, b) for a, b, _ in merges]


def _add_gguf_added_tokens(backend: Tokenizer, tokens: list[str], types: list[int]) -> None:
    control = [AddedToken(t, special=True, normalized=False)
               for t, kind in zip(tokens, types) if kind == TOKEN_TYPE_CONTROL]
    user = [AddedToken(t, special=False, normalized=False)
            for t, kind in zip(tokens, types) if kind == TOKEN_TYPE_USER_DEFINED]
    if control:
        backend.add_special_tokens(control)
    if user:
        backend.add_tokens(user)


def _post_processor(backend: Tokenizer, bos: str | None, eos: str | None) -> processors.PostProcessor | None:
    """BOS/EOS insertion (None when neither is added)."""
    if bos is None and eos is None:
        return None
    single = ([f"{bos}:0"] if bos else []) + ["$A:0"] + ([f"{eos}:0"] if eos else [])
    pair = single + ([f"{bos}:1"] if bos else []) + ["$B:1"] + ([f"{eos}:1"] if eos else [])
    special = [(t, backend.token_to_id(t)) for t in dict.fromkeys(x for x in (bos, eos) if x)]
    return processors.TemplateProcessing(single=" ".join(single), pair=" ".join(pair), special_tokens=special)


def set_bos_eos_insertion(backend: Tokenizer, bos: str | None, eos: str | None) -> None:
    """Make `backend.encode(..., add_special_tokens=True)` add exactly `bos` before / `eos` after."""
    backend.post_processor = _post_processor(backend, bos, eos)


def build_gguf_backend(meta: dict[str, Any]) -> Tokenizer:
    """A `tokenizers.Tokenizer` from GGUF metadata (`tokenizer.ggml.*` keys), without BOS/EOS insertion.

    >>> backend = build_gguf_backend(gguf_metadata(reader))        # doctest: +SKIP
    >>> backend.encode("Hello world").ids                           # doctest: +SKIP
    [19556, 905]
    """
    model = meta.get("tokenizer.ggml.model", "gpt2")
    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    types: list[int] = meta.get("tokenizer.ggml.token_type") or [TOKEN_TYPE_NORMAL] * len(tokens)
    added = {i for i, kind in enumerate(types) if kind in (TOKEN_TYPE_CONTROL, TOKEN_TYPE_USER_DEFINED)}
    if model == "gpt2":
        vocab = _vocab(tokens, added, respell=True)
        merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges") or []]
        pre, ignore_merges = byte_level_pre_tokenizer(meta.get("tokenizer.ggml.pre", "default"))
        backend = Tokenizer(BPE(vocab, merges, fuse_unk=False, byte_fallback=False, ignore_merges=ignore_merges))
        if meta.get("tokenizer.ggml.pre") in _NFC_FAMILY:
            backend.normalizer = normalizers.NFC()
        backend.pre_tokenizer = pre
        backend.decoder = decoders.ByteLevel()
    elif model == "llama":
        vocab = _vocab(tokens, added, respell=False)
        scores = meta.get("tokenizer.ggml.scores") or [-float(i) for i in range(len(tokens))]
        merges = ([tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
                  if meta.get("tokenizer.ggml.merges") else sentencepiece_merges(vocab, scores, tokens))
        unk_id = meta.get("tokenizer.ggml.unknown_token_id")
        if unk_id is None:
            unk_id = next((i for i, kind in enumerate(types) if kind == TOKEN_TYPE_UNKNOWN), None)
        unk = tokens[unk_id] if unk_id is not None else None
        backend = Tokenizer(BPE(vocab, merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
        prefix_space = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
        backend.pre_tokenizer = pre_tokenizers.Metaspace(
            replacement="▁", prepend_scheme="first" if prefix_space else "never", split=False)
        steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
        backend.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if prefix_space else []))
    else:
        raise ValueError(f"GGUF tokenizer model {model!r} is not supported (supported: 'gpt2' byte-level BPE, "
                         "'llama' SentencePiece BPE); load the model from a Hugging Face folder instead")
    _add_gguf_added_tokens(backend, tokens, types)
    return backend


# Bump when build_gguf_backend changes what it builds: cached tokenizers of an older build are then rebuilt.
_BUILD_VERSION = 1
# content key -> the built backend, shared in this process. NOTE: safe to share: the only later change to a
# backend is Tokenizer._set_bos_eos's post-processor, which the same tokenizer.ggml.* entries (in the key)
# set identically every time; grammars/vocabulary.py encodes with a private copy.
_BUILT: dict[str, Tokenizer] = {}


def _content_key(meta: dict[str, Any]) -> str:
    """A hash of everything build_gguf_backend reads (the tokenizer.ggml.* entries), so a cached tokenizer is
    reused only for the same vocabulary, whatever the file is called."""
    import hashlib

    h = hashlib.sha256(f"v{_BUILD_VERSION}".encode())
    for key in sorted(k for k in meta if k.startswith("tokenizer.ggml.")):
        value = meta[key]
        h.update(key.encode() + b"\0")
        h.update("\0".join(map(str, value)).encode() if isinstance(value, list) else repr(value).encode())
        h.update(b"\1")
    return h.hexdigest()[:32]


def cache_dir() -> str:
    """Where built tokenizers are kept: $SGL_CACHE_DIR/tokenizers, else ~/.cache/sgl/tokenizers."""
    root = os.environ.get("SGL_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "sgl")
    return os.path.join(root, "tokenizers")


def cached_gguf_backend(meta: dict[str, Any]) -> Tokenizer:
    """build_gguf_backend(meta), built once per vocabulary: this process's built tokenizer, else the on-disk
    cache's (tokenizers' JSON), else built now and saved there.

    NOTE: Gemma 3's 262K-token SentencePiece vocabulary takes seconds to turn into BPE merges in Python
    (sentencepiece_merges); before this every model load (the pool's startup read, each engine load, each
    reload after an LRU unload) rebuilt it. A cache that cannot be written (read-only home) only costs the
    rebuild in the next process."""
    key = _content_key(meta)
    if key in _BUILT:
        return _BUILT[key]
    path = os.path.join(cache_dir(), f"gguf-{key}.json")
    backend = None
    if os.path.isfile(path):
        try:
            backend = Tokenizer.from_file(path)
        except Exception:  # noqa: BLE001 - a truncated or foreign cache entry is a miss
            logger.warning("tokenizer cache entry %s is unreadable; rebuilding it", path)
    if backend is None:
        backend = build_gguf_backend(meta)
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.{os.getpid()}.tmp"
            backend.save(tmp)
            os.replace(tmp, path)  # atomic: a concurrent reader sees the whole file or none
        except OSError as e:
            logger.info("cannot cache the tokenizer in %s: %s", path, e)
    _BUILT[key] = backend
    return backend

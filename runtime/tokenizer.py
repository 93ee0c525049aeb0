"""The runtime's tokenizer: a `tokenizers.Tokenizer` plus the model's special tokens and chat template.

Built from a Hugging Face folder (tokenizer.json + tokenizer_config.json) or from a GGUF file's
metadata, so the runtime never needs transformers at serving time.

    tok = Tokenizer.load("default")            # or a folder, or a .gguf path
    ids = tok.encode("Hello world")            # [19556, 905]
    tok.decode(ids)                            # 'Hello world'
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}])

`IncrementalDetokenizer` turns a stream of token ids into text pieces for streaming.
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterable, Optional, Union

from tokenizers import Tokenizer as BackendTokenizer

from sgl.runtime.chat_template import render_chat_template
from sgl.runtime.tokenizer_gguf import cached_gguf_backend, set_bos_eos_insertion

# End-of-turn tokens: when the chat template writes one, generation stops at it too.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>", "<|end_of_turn|>",
                      "<|endoftext|>")


def _token_str(value: Any) -> Optional[str]:
    """tokenizer_config.json spells a token as a string or as {"content": ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


class Tokenizer:
    """Encode/decode text for one model.

    >>> tok = Tokenizer.load("default")
    >>> tok.encode("Hello world")
    [19556, 905]
    >>> tok.decode([1, 19556, 905], skip_special_tokens=False)
    '<|im_start|>Hello world'
    >>> sorted(tok.eos_token_ids)
    [2]
    """

    def __init__(
        self,
        backend: BackendTokenizer,
        *,
        bos_token: Optional[str] = None,
        eos_token: Optional[str] = None,
        pad_token: Optional[str] = None,
        unk_token: Optional[str] = None,
        add_bos_token: Optional[bool] = None,
        add_eos_token: Optional[bool] = None,
        chat_template: Optional[str] = None,
        extra_eos_token_ids: Iterable[int] = (),
        name_or_path: str = "",
    ) -> None:
        self.backend = backend
        self.name_or_path = name_or_path
        self.chat_template = chat_template
        self.bos_token, self.eos_token, self.pad_token, self.unk_token = bos_token, eos_token, pad_token, unk_token
        self.bos_token_id = self._id_or_none(bos_token)
        self.eos_token_id = self._id_or_none(eos_token)
        self.pad_token_id = self._id_or_none(pad_token)
        self.unk_token_id = self._id_or_none(unk_token)
        if add_bos_token is not None or add_eos_token is not None:
            self._set_bos_eos(add_bos_token, add_eos_token)

        eos = {self.eos_token_id} if self.eos_token_id is not None else set()
        eos.update(int(i) for i in extra_eos_token_ids)
        for token in END_OF_TURN_TOKENS:
            token_id = backend.token_to_id(token)
            if chat_template and token in chat_template and token_id is not None:
                eos.add(token_id)
        self.eos_token_ids: frozenset[int] = frozenset(eos)
        special = {i for i, t in backend.get_added_tokens_decoder().items() if t.special}
        special.update(i for i in (self.bos_token_id, self.eos_token_id, self.pad_token_id, self.unk_token_id)
                       if i is not None)
        self.special_token_ids: frozenset[int] = frozenset(special)

    def _id_or_none(self, token: Optional[str]) -> Optional[int]:
        return self.backend.token_to_id(token) if token is not None else None

    def _set_bos_eos(self, add_bos: Optional[bool], add_eos: Optional[bool]) -> None:
        """Make encode() add BOS/EOS as the config says, unless the backend already does exactly that.
        NOTE: this replaces `backend.post_processor` when it must change."""
        with_special = self.backend.encode("a", add_special_tokens=True).ids
        plain = self.backend.encode("a", add_special_tokens=False).ids
        adds_bos = len(with_special) > len(plain) and with_special[0] == self.bos_token_id
        adds_eos = len(with_special) > len(plain) and with_special[-1] == self.eos_token_id
        want_bos = adds_bos if add_bos is None else (add_bos and self.bos_token_id is not None)
        want_eos = adds_eos if add_eos is None else (add_eos and self.eos_token_id is not None)
        if (want_bos, want_eos) != (adds_bos, adds_eos):
            set_bos_eos_insertion(self.backend, self.bos_token if want_bos else None,
                                  self.eos_token if want_eos else None)

    # ---- construction -----------------------------------------------------------------------------

    @classmethod
    def load(cls, path: str) -> "Tokenizer":
        """From "default", a .gguf file or a Hugging Face folder."""
        from sgl.runtime.models.default_model import resolve_model_path

        path = resolve_model_path(path)
        return cls.from_gguf(path) if os.path.isfile(path) else cls.from_folder(path)

    @classmethod
    def from_folder(cls, path: str) -> "Tokenizer":
        """From a Hugging Face model folder: tokenizer.json, tokenizer_config.json, and optionally
        chat_template.jinja / chat_template.json, special_tokens_map.json, generation_config.json."""
        tokenizer_file = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(tokenizer_file):
            raise FileNotFoundError(f"{path!r} has no tokenizer.json (only fast tokenizers are supported; "
                                    "convert a sentencepiece tokenizer.model with transformers first)")
        backend = BackendTokenizer.from_file(tokenizer_file)
        config = _read_json(os.path.join(path, "tokenizer_config.json"))
        special_map = _read_json(os.path.join(path, "special_tokens_map.json"))

        def special(name: str) -> Optional[str]:
            return _token_str(config.get(name)) or _token_str(special_map.get(name))

        template: Any = config.get("chat_template")
        jinja_file = os.path.join(path, "chat_template.jinja")
        if os.path.isfile(jinja_file):
            with open(jinja_file, encoding="utf-8") as f:
                template = f.read()
        elif template is None:
            template = _read_json(os.path.join(path, "chat_template.json")).get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
            named = {t["name"]: t["template"] for t in template}
            template = named.get("default", next(iter(named.values()), None))

        generation = _read_json(os.path.join(path, "generation_config.json"))
        eos = generation.get("eos_token_id")
        extra_eos = eos if isinstance(eos, list) else ([eos] if isinstance(eos, int) else [])
        return cls(
            backend,
            bos_token=special("bos_token"),
            eos_token=special("eos_token"),
            pad_token=special("pad_token"),
            unk_token=special("unk_token"),
            add_bos_token=config.get("add_bos_token"),
            add_eos_token=config.get("add_eos_token"),
            chat_template=template,
            extra_eos_token_ids=extra_eos,
            name_or_path=path,
        )

    @classmethod
    def from_gguf(cls, source: Union[str, Any, dict]) -> "Tokenizer":
        """From a GGUF file: a path, a `GGUFFile`, a `gguf.GGUFReader`, or the metadata as a dict."""
        from sgl.runtime.models.gguf_file import GGUFFile, metadata_from_reader

        name = source if isinstance(source, str) else getattr(source, "path", "")
        if isinstance(source, dict):
            meta = source
        elif isinstance(source, (str, GGUFFile)):
            meta = (GGUFFile(source) if isinstance(source, str) else source).metadata
        else:
            meta = metadata_from_reader(source)
        tokens = meta["tokenizer.ggml.tokens"]
        backend = cached_gguf_backend(meta)  # built once per vocabulary (Gemma: seconds), then cached

        def token(key: str) -> Optional[str]:
            i = meta.get(f"tokenizer.ggml.{key}")
            return tokens[i] if i is not None and 0 <= i < len(tokens) else None

        # llama.cpp adds BOS to SentencePiece models unless the file says otherwise.
        add_bos = meta.get("tokenizer.ggml.add_bos_token", meta.get("tokenizer.ggml.model") == "llama")
        return cls(
            backend,
            bos_token=token("bos_token_id"),
            eos_token=token("eos_token_id"),
            pad_token=token("padding_token_id"),
            unk_token=token("unknown_token_id"),
            add_bos_token=bool(add_bos),
            add_eos_token=bool(meta.get("tokenizer.ggml.add_eos_token", False)),
            chat_template=meta.get("tokenizer.chat_template"),
            extra_eos_token_ids=[meta[k] for k in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")
                                 if meta.get(k) is not None],
            name_or_path=str(name),
        )

    # ---- encode / decode --------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included (the model's embedding may have more rows)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; special-token text such as "<|im_start|>" becomes its single id."""
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=add_special_tokens)]

    def decode(self, ids: list[int], skip_special_tokens: bool = True,
               spaces_between_special_tokens: bool = True) -> str:
        """Text of `ids`. `spaces_between_special_tokens` is accepted for SGLang compatibility and, as in
        transformers' fast tokenizers (which SGLang uses), changes nothing."""
        del spaces_between_special_tokens
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> Optional[str]:
        """The vocabulary string of a token (byte-level spelling, e.g. 'Ġworld'); None if out of range."""
        return self.backend.id_to_token(token_id)

    def token_to_id(self, token: str) -> Optional[int]:
        return self.backend.token_to_id(token)

    # ---- chat -------------------------------------------------------------------------------------

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs: Any) -> str:
        """Render a conversation with the model's chat template, as transformers'
        `apply_chat_template(..., tokenize=False)` does. Encode the result with `add_special_tokens=False`.

        >>> Tokenizer.load("default").apply_chat_template([{"role": "user", "content": "Hi"}])[-52:]
        '<|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\n'
        """
        template = kwargs.pop("chat_template", None) or self.chat_template
        if kwargs.get("continue_final_message"):
            add_generation_prompt = False  # continuing the last (assistant) message: no new turn
        if template is None:
            raise ValueError(f"tokenizer {self.name_or_path!r} has no chat template; pass chat_template=...")
        tokens = {"bos_token": self.bos_token, "eos_token": self.eos_token, "unk_token": self.unk_token,
                  "pad_token": self.pad_token}
        return render_chat_template(template, messages, add_generation_prompt=add_generation_prompt,
                                    special_tokens={k: v for k, v in tokens.items() if v is not None}, **kwargs)

    def __repr__(self) -> str:
        return (f"Tokenizer({self.name_or_path!r}, vocab_size={self.vocab_size}, bos={self.bos_token!r}, "
                f"eos={self.eos_token!r}, eos_token_ids={sorted(self.eos_token_ids)})")


class IncrementalDetokenizer:
    """Text for a stream of token ids, one piece per call, safe to show as it comes.

    A piece is held back while the text ends in an incomplete UTF-8 sequence (a byte-level token can
    carry half a character), so no "\\ufffd" from a split character is ever emitted. Each step decodes
    only a small window `ids[prefix:]` and subtracts the text of `ids[prefix:read]` (the vLLM/SGLang
    scheme), so leading-space rules that depend on the previous token stay right. Invariant: the
    concatenation of every piece plus `flush()` equals `decode(context_ids + ids)` minus
    `decode(context_ids)` (with no context: `decode(ids)`).

    >>> tok = Tokenizer.load("default")
    >>> d = IncrementalDetokenizer(tok)
    >>> [d.add(i) for i in tok.encode("Hi 👋")] + [d.flush()]
    ['Hi', '', '', ' 👋', '']
    """

    CONTEXT_TOKENS = 5  # tokens of context to decode with (as SGLang's INIT_INCREMENTAL_DETOKENIZATION_OFFSET)

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True,
                 spaces_between_special_tokens: bool = True, context_ids: Iterable[int] = ()) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.spaces_between_special_tokens = spaces_between_special_tokens
        self._ids: list[int] = list(context_ids)
        self._num_context = len(self._ids)
        self._read = len(self._ids)  # ids[:read] are fully emitted
        self._prefix = max(0, self._read - self.CONTEXT_TOKENS)  # window start; ids[prefix:read] is context
        self.text = ""  # everything emitted so far

    @property
    def output_ids(self) -> list[int]:
        return self._ids[self._num_context:]

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, self.skip_special_tokens, self.spaces_between_special_tokens)

    def _step(self, final: bool) -> str:
        prefix_text = self._decode(self._ids[self._prefix:self._read])
        new_text = self._decode(self._ids[self._prefix:])
        if len(new_text) <= len(prefix_text) and not final:
            return ""
        if new_text.endswith("\ufffd") and not final:
            return ""  # an incomplete UTF-8 sequence: wait for the rest of the character
        piece = new_text[len(prefix_text):]
        self._prefix, self._read = self._read, len(self._ids)
        self.text += piece
        return piece

    def add(self, token_id: int) -> str:
        """Feed one token id; returns the new text (possibly "")."""
        self._ids.append(int(token_id))
        return self._step(final=False)

    def extend(self, token_ids: Iterable[int]) -> str:
        """Feed several ids; returns their new text."""
        return "".join(self.add(i) for i in token_ids)

    def flush(self) -> str:
        """Emit whatever is held back (call once the sequence is finished)."""
        if self._read == len(self._ids):
            return ""
        return self._step(final=True)

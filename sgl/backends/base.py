"""What a DSL backend is: plain values in, plain values out; it never sees the interpreter.

The interpreter hands a backend a `Prompt` (the text so far, plus the chat messages for chat-only
APIs) and a `GenParams`; it gets back a `GenResult`. Backends that speak SGLang's native /generate
API share their logic in `sgl.backends.native.NativeBackend`.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional, Union

from sgl.chat_template import ChatTemplate
from sgl.choices import ChoicesDecision, ChoicesSamplingMethod
from sgl.sampling import GenParams


class BackendError(RuntimeError):
    """The backend failed (server error, connection lost, request aborted)."""


class UnsupportedFeatureError(NotImplementedError):
    """This backend cannot do what the program asked (e.g. `select` on a chat-only API)."""


@dataclass(frozen=True)
class Prompt:
    """Everything a backend may need about the program's state at a `gen` or `select`."""

    text: str  # the full text so far (completion-style backends send this)
    messages: list[dict[str, str]] = field(default_factory=list)  # finished chat turns
    role: Optional[str] = None  # the role open at this point, if any
    role_text: str = ""  # text written inside the open role so far


@dataclass
class GenResult:
    """`text` is a string (a list of n strings when the gen asked for n > 1); `meta_info` likewise."""

    text: Union[str, list[str]]
    meta_info: Union[dict[str, Any], list[dict[str, Any]]]


class Backend:
    """Base class of DSL backends. Subclasses implement `generate` and usually `generate_stream`,
    `select` and `prefill`."""

    #: True when the backend only understands chat messages (no raw text continuation).
    is_chat_model: bool = False

    def get_chat_template(self) -> ChatTemplate:
        raise NotImplementedError

    def generate(self, prompt: Prompt, params: GenParams) -> GenResult:
        raise NotImplementedError

    def generate_stream(self, prompt: Prompt, params: GenParams) -> Iterator[GenResult]:
        """Cumulative results: each has all the text generated so far. Default: one final result."""
        yield self.generate(prompt, params)

    def select(self, prompt: Prompt, choices: list[str], temperature: float,
               method: ChoicesSamplingMethod, model: Optional[str] = None,
               lora_path: Optional[str] = None) -> ChoicesDecision:
        raise UnsupportedFeatureError(f"{type(self).__name__} cannot score choices (select)")

    def prefill(self, texts: list[str]) -> None:
        """Put these prompts' KV into the runtime's prefix cache (max_new_tokens=0). Default: no-op."""

    def flush_cache(self) -> bool:
        return False

    def get_server_info(self) -> dict[str, Any]:
        return {}

    def shutdown(self) -> None:
        pass


_default_lock = threading.Lock()
_default_backend: Optional[Backend] = None


def set_default_backend(backend: Backend) -> None:
    """Make `backend` the one `fn.run()` uses when no `backend=` is given."""
    global _default_backend
    if not isinstance(backend, Backend):
        raise TypeError(f"set_default_backend expects an sgl backend (Runtime, RuntimeEndpoint, OpenAI), got {backend!r}")
    with _default_lock:
        _default_backend = backend


def get_default_backend() -> Optional[Backend]:
    return _default_backend


def resolve_backend(backend: Optional[Backend]) -> Backend:
    b = backend or _default_backend
    if b is None:
        raise RuntimeError("no backend: pass backend=... or call sgl.set_default_backend(sgl.Runtime(...))")
    return b

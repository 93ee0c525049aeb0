"""DSL backends: `Runtime` (in-process engine), `RuntimeEndpoint` (HTTP, native API), `OpenAI`.

They take plain values (a `Prompt`, `GenParams`) and never see the interpreter; see `base.py`.
Each is imported on first use, so `import sgl` loads neither torch, httpx nor openai.
"""

from __future__ import annotations

from typing import Any

from sgl.backends.base import Backend, BackendError, GenResult, Prompt, UnsupportedFeatureError

__all__ = ["Backend", "BackendError", "GenResult", "Prompt", "UnsupportedFeatureError", "Runtime",
           "RuntimeEndpoint", "OpenAI"]

_LAZY = {"Runtime": "sgl.backends.runtime", "RuntimeEndpoint": "sgl.backends.runtime_endpoint",
         "OpenAI": "sgl.backends.openai"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'sgl.backends' has no attribute {name!r}")

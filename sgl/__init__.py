"""sgl: an SGLang-compatible language for LM programs, and the runtime that serves them.

    import sgl

    @sgl.function
    def qa(s, question):
        s += sgl.user(question)
        s += sgl.assistant(sgl.gen("answer", max_tokens=64))

    sgl.set_default_backend(sgl.Runtime(model_path="default"))      # or sgl.RuntimeEndpoint(url)
    print(qa.run(question="What is the capital of France?", temperature=0)["answer"])

`import sgl` loads no torch: the engine (`sgl.Engine`, `sgl.Runtime`) is imported on first use.
"""

from __future__ import annotations

from typing import Any

from sgl.api import (assistant, assistant_begin, assistant_end, flush_cache, function, gen, gen_int, gen_string,
                     get_server_info, select, set_default_backend, system, system_begin, system_end, user,
                     user_begin, user_end)
from sgl.backends.base import Backend, BackendError, UnsupportedFeatureError, get_default_backend
from sgl.chat_template import ChatTemplate, ChatTemplateError
from sgl.choices import (ChoicesDecision, ChoicesSamplingMethod, greedy_token_selection, token_length_normalized,
                         unconditional_likelihood_normalized)
from sgl.function import SglFunction
from sgl.interpreter import ProgramError
from sgl.runtime.protocol import RequestError
from sgl.state import ProgramState, ProgramStateGroup
from sgl.tracer import ProgramTrace, TracingError

__version__ = "0.1.0"

__all__ = [
    "function", "gen", "gen_int", "gen_string", "select", "system", "user", "assistant", "system_begin",
    "system_end", "user_begin", "user_end", "assistant_begin", "assistant_end", "set_default_backend",
    "get_default_backend", "flush_cache", "get_server_info", "Runtime", "RuntimeEndpoint", "OpenAI", "Engine",
    "Backend", "BackendError", "UnsupportedFeatureError", "RequestError", "ProgramError", "TracingError",
    "ChatTemplate", "ChatTemplateError", "ChoicesDecision", "ChoicesSamplingMethod", "token_length_normalized",
    "greedy_token_selection", "unconditional_likelihood_normalized", "SglFunction", "ProgramState",
    "ProgramStateGroup", "ProgramTrace",
]

# NOTE: resolved on first access (PEP 562) so that `import sgl` imports no torch, httpx or openai.
_LAZY = {"Engine": ("sgl.runtime.engine", "Engine"), "Runtime": ("sgl.backends.runtime", "Runtime"),
         "RuntimeEndpoint": ("sgl.backends.runtime_endpoint", "RuntimeEndpoint"),
         "OpenAI": ("sgl.backends.openai", "OpenAI")}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'sgl' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))

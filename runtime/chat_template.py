"""Rendering a model's Jinja chat template exactly as transformers' `apply_chat_template` does.

The environment matches transformers': a sandboxed, immutable Jinja environment with
`trim_blocks`/`lstrip_blocks`, the `loopcontrols` extension, a `tojson` filter that does not escape
HTML or non-ASCII, and the globals `raise_exception` and `strftime_now`. Templates come from model
files, so they are untrusted code: the sandbox is not optional.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any, Optional

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

# NOTE: transformers marks where the final message ends with this tag when continuing a message.
_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: Optional[int] = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=16)
def compile_chat_template(template: str) -> jinja2.Template:
    """Compile (and cache) a chat template in transformers' sandboxed environment."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(template)


def _plain_messages(messages: list[dict]) -> list[dict]:
    """Copy the messages, dropping keys whose value is None (as transformers does: OpenAI clients send
    `content=None` with tool calls, and templates render a literal "None" for it)."""
    out = []
    for message in messages:
        if not isinstance(message, dict):
            raise TypeError(f"chat messages must be dicts with 'role' and 'content', got {message!r}")
        out.append({k: v for k, v in message.items() if v is not None})
    return out


def render_chat_template(
    template: str,
    messages: list[dict],
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
    special_tokens: Optional[dict[str, Optional[str]]] = None,
    **kwargs: Any,
) -> str:
    """Render `messages` with `template`; `special_tokens` (bos_token, eos_token, ...) and `kwargs`
    (tools, documents, enable_thinking, ...) become template variables.

    >>> render_chat_template("{% for m in messages %}<{{m.role}}>{{m.content}}{% endfor %}"
    ...                      "{% if add_generation_prompt %}<assistant>{% endif %}",
    ...                      [{"role": "user", "content": "hi"}])
    '<user>hi<assistant>'
    """
    chat = _plain_messages(messages)
    final = ""
    if continue_final_message:
        if not chat or not isinstance(chat[-1].get("content"), str):
            raise ValueError("continue_final_message needs a final message with string content")
        if add_generation_prompt:
            raise ValueError("continue_final_message and add_generation_prompt cannot both be set")
        final = chat[-1]["content"]
        chat[-1] = {**chat[-1], "content": final + _CONTINUE_TAG}
    # NOTE: `tools`/`documents` must be None, not undefined: `{% if tools is not none %}` is true when undefined.
    variables: dict[str, Any] = {"tools": None, "documents": None, **(special_tokens or {})}
    variables.update(kwargs)  # kwargs win over special tokens, as in transformers
    text = compile_chat_template(template).render(
        messages=chat, add_generation_prompt=add_generation_prompt, **variables
    )
    if continue_final_message:
        # Cut everything the template wrote after the final message's content (its end-of-turn).
        tag = _CONTINUE_TAG.strip()
        if final.strip() not in text or tag not in text:
            raise ValueError("continue_final_message: the chat template does not render the final message's content")
        at = text.rindex(tag)
        # A template that strips the content also strips the tag's trailing space: strip like it (as transformers).
        text = text[:at] if text[at:at + len(_CONTINUE_TAG)] == _CONTINUE_TAG else text[:at].rstrip()
    return text

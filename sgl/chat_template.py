"""Role markup for `sgl.system/user/assistant`, derived from the model's OWN chat template.

A chat template renders a whole message list; a DSL program opens and closes roles one at a time.
`ChatTemplate` bridges the two: to open role R after messages H it renders H and H + [R: SENTINEL]
and takes what lies between as R's prefix, and what follows the sentinel as R's suffix. The text a
program builds is therefore exactly what the template renders for the same messages (including a
default system prompt that some templates insert before the first user turn).

The renderer comes from the backend: the in-process tokenizer's `apply_chat_template`, the template
string a server reports in `/get_model_info`, or, for a server that reports none (a real SGLang
server), a template inferred from the model path as SGLang does (`template_for_model_path`).

    >>> t = ChatTemplate.from_jinja(CHATML)
    >>> t.role_prefix("user", []), t.role_suffix("user", [])
    ('<|im_start|>user\\n', '<|im_end|>\\n')
    >>> t.stop_str
    ['<|im_end|>']
"""

from __future__ import annotations

import re
from typing import Callable, Optional

Messages = list[dict[str, str]]
Renderer = Callable[[Messages], str]  # messages -> text, without a generation prompt

# NOTE: no whitespace, so templates that strip or trim the content leave it intact.
SENTINEL = "\x1eSGL-CONTENT\x1e"
SENTINEL_CORE = SENTINEL.strip()  # what is left when a template strips whitespace (\x1e counts as such)

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
LLAMA3 = ("{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n'"
          " + m['content'] + '<|eot_id|>' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
LLAMA2 = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ '<<SYS>>\n' + m['content'] + '\n<</SYS>>\n\n' }}"
          "{% elif m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
          "{% else %}{{ ' ' + m['content'] + '</s>' }}{% endif %}{% endfor %}")
PLAIN = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] + '\n\n' }}"
         "{% elif m['role'] == 'user' %}{{ 'USER: ' + m['content'] + '\n' }}"
         "{% else %}{{ 'ASSISTANT: ' + m['content'] + '\n' }}{% endif %}{% endfor %}")

# Model-path patterns -> template, for servers that do not report their template (first match wins).
_PATH_TEMPLATES: list[tuple[str, str]] = [
    (r"llama-?3|llama3", LLAMA3),
    (r"llama-?2|mistral|mixtral", LLAMA2),
    (r"smollm|qwen|chatml|hermes|yi-|tinyllama", CHATML),
]


class ChatTemplateError(ValueError):
    """The chat template cannot express what the program asked (e.g. it drops a role)."""


class ChatTemplate:
    """Role prefixes and suffixes derived from a message-list renderer."""

    def __init__(self, render: Renderer, name: str = "model") -> None:
        self._render = render
        self.name = name
        self._stop_str: Optional[list[str]] = None

    @classmethod
    def from_jinja(cls, template: str, special_tokens: Optional[dict[str, Optional[str]]] = None,
                   name: str = "jinja") -> "ChatTemplate":
        """A template given as a Jinja string (rendered like transformers' apply_chat_template)."""

        def render(messages: Messages) -> str:
            # NOTE: imported here: the renderer is torch-free, and `import sgl` stays light.
            from sgl.runtime.chat_template import render_chat_template

            return render_chat_template(template, messages, add_generation_prompt=False,
                                        special_tokens={"bos_token": "", "eos_token": "", **(special_tokens or {})})

        return cls(render, name)

    def _split(self, role: str, history: Messages) -> tuple[str, str, str]:
        """(text of history, prefix of `role`, suffix of `role`) when `role` follows `history`."""
        before = self._render(history) if history else ""
        try:
            full = self._render(history + [{"role": role, "content": SENTINEL}])
        except Exception as e:  # templates raise_exception() on role orders they do not support
            raise ChatTemplateError(f"chat template {self.name!r} cannot render a {role!r} message after "
                                    f"{[m['role'] for m in history]}: {e}") from e
        at, width = full.find(SENTINEL), len(SENTINEL)
        if at < 0:  # a template that trims the content (Gemma's `| trim`) drops the \x1e separators
            at, width = full.find(SENTINEL_CORE), len(SENTINEL_CORE)
        if at < 0:
            raise ChatTemplateError(f"chat template {self.name!r} does not render the content of a {role!r} message")
        head, tail = full[:at], full[at + width:]
        if not head.startswith(before):
            # The template rewrote earlier turns once another follows: keep what is already written.
            n = 0
            while n < min(len(head), len(before)) and head[n] == before[n]:
                n += 1
            before = before[:n]
        return before, head[len(before):], tail

    def role_prefix(self, role: str, history: Messages) -> str:
        return self._split(role, history)[1]

    def role_suffix(self, role: str, history: Messages) -> str:
        return self._split(role, history)[2]

    @property
    def stop_str(self) -> list[str]:
        """End-of-turn strings a generation inside a role stops at (the assistant suffix, stripped)."""
        if self._stop_str is None:
            try:
                end = self.role_suffix("assistant", [{"role": "user", "content": "hi"}]).strip()
            except ChatTemplateError:
                end = ""
            self._stop_str = [end] if end else []
        return self._stop_str

    def render(self, messages: Messages) -> str:
        return self._render(messages)

    def __repr__(self) -> str:
        return f"ChatTemplate({self.name!r})"


def template_for_model_path(model_path: str) -> ChatTemplate:
    """SGLang's fallback: a template chosen by matching the model path (for servers that do not
    report their template). Unknown models get a plain `USER:`/`ASSISTANT:` template."""
    path = (model_path or "").lower()
    for pattern, template in _PATH_TEMPLATES:
        if re.search(pattern, path):
            return ChatTemplate.from_jinja(template, name=f"inferred from {model_path!r}")
    return ChatTemplate.from_jinja(PLAIN, name="plain")

"""Role markup derived from a model's own chat template."""

from __future__ import annotations

import pytest

from fake_backend import SMOL_TEMPLATE
from sgl.chat_template import CHATML, LLAMA3, ChatTemplate, ChatTemplateError, template_for_model_path
from sgl.runtime.chat_template import render_chat_template


def test_chatml_prefix_suffix():
    t = ChatTemplate.from_jinja(CHATML)
    assert t.role_prefix("assistant", [{"role": "user", "content": "x"}]) == "<|im_start|>assistant\n"
    assert t.role_suffix("assistant", []) == "<|im_end|>\n"
    assert t.stop_str == ["<|im_end|>"]


def test_default_system_prompt_comes_from_the_template():
    t = ChatTemplate.from_jinja(SMOL_TEMPLATE)
    first_user = t.role_prefix("user", [])
    assert first_user.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")
    assert first_user.endswith("<|im_start|>user\n")
    # after a system turn there is no default system prompt
    assert t.role_prefix("user", [{"role": "system", "content": "S"}]) == "<|im_start|>user\n"


@pytest.mark.parametrize("template", [CHATML, LLAMA3, SMOL_TEMPLATE])
def test_piecewise_rendering_equals_whole_rendering(template):
    t = ChatTemplate.from_jinja(template, {"bos_token": "<s>"})
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "Bye"}]
    text, hist = "", []
    for m in msgs:
        text += t.role_prefix(m["role"], hist) + m["content"] + t.role_suffix(m["role"], hist)
        hist.append(m)
    whole = render_chat_template(template, msgs, add_generation_prompt=False, special_tokens={"bos_token": "<s>"})
    assert text == whole


def test_template_that_refuses_a_role_raises_clearly():
    strict = "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system') }}{% endif %}" \
             "{{ m['content'] }}{% endfor %}"
    with pytest.raises(ChatTemplateError, match="cannot render a 'system' message"):
        ChatTemplate.from_jinja(strict).role_prefix("system", [])


def test_template_inferred_from_model_path():
    assert template_for_model_path("HuggingFaceTB/SmolLM2-135M-Instruct").role_prefix("user", []) == "<|im_start|>user\n"
    assert "<|start_header_id|>user" in template_for_model_path("meta-llama/Llama-3.1-8B").role_prefix("user", [])
    assert template_for_model_path("unknown/model").role_prefix("user", []) == "USER: "

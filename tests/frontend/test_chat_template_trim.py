"""Templates that trim message content (Gemma 3's `message['content'] | trim`) still split into role
prefix and suffix: Python's strip() removes the sentinel's \\x1e separators, not its core."""

from __future__ import annotations

from sgl.chat_template import ChatTemplate

TRIMMING = ("{{ bos_token }}{% for m in messages %}{{ '<start_of_turn>' + m['role'] + '\\n' + (m['content'] | trim)"
            " + '<end_of_turn>\\n' }}{% endfor %}")


def test_trimming_template_splits_roles() -> None:
    t = ChatTemplate.from_jinja(TRIMMING, special_tokens={"bos_token": "<bos>"})
    assert t.role_prefix("user", []) == "<bos><start_of_turn>user\n"
    assert t.role_suffix("user", []) == "<end_of_turn>\n"
    assert t.stop_str == ["<end_of_turn>"]

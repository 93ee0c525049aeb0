"""Regex helpers shared by backends that take a regex (outlines, xgrammar) for `choices`."""
from __future__ import annotations

_META = set("\\.^$*+?{}[]()|-/&~#\"")


def escape_literal(text: str) -> str:
    """Escape `text` for Python, Rust (regex crate) and xgrammar regexes alike: only metacharacters
    get a backslash, control characters become \\xHH/\\uHHHH.

    >>> escape_literal("a.b (c)")
    'a\\\\.b \\\\(c\\\\)'
    """
    out = []
    for ch in text:
        if ch in _META:
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(ch)
    return "".join(out)


def choices_regex(choices: tuple[str, ...]) -> str:
    return "(" + "|".join(escape_literal(c) for c in choices) + ")"

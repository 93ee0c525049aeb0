"""The one exception type of `sgl.grammars`.

A `GrammarError` is raised only at validation/compile time (request submission). Matchers never raise
inside the serving loop: they enter an error state (`matcher.error`) instead.
"""
from __future__ import annotations

from typing import Optional


class GrammarError(ValueError):
    """A constraint that cannot be compiled: bad regex, invalid or unsupported JSON schema, bad EBNF.

    `keyword` and `path` (a JSON pointer such as ``/properties/age``) are set for JSON-schema errors so the
    HTTP layer can answer 400 with a message that says what to fix.

    >>> str(GrammarError("unsupported keyword", keyword="not", path="/properties/a"))
    "unsupported keyword (keyword 'not' at schema path '/properties/a')"
    """

    def __init__(self, message: str, *, keyword: Optional[str] = None, path: Optional[str] = None):
        self.message = message
        self.keyword = keyword
        self.path = path
        where = []
        if keyword is not None:
            where.append(f"keyword {keyword!r}")
        if path is not None:
            where.append(f"at schema path {path or '/'!r}")
        super().__init__(f"{message} ({' '.join(where)})" if where else message)


class GrammarTimeout(GrammarError):
    """Compilation did not finish within the compiler's `compile_timeout_s`."""

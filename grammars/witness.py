"""Witnesses: short strings that complete a string value the closing walks cannot complete by chance.

Budget closing (sgl.grammars.budget) walks from the current state with a fixed preference of one-token
choices. Inside a string constrained by a pattern or a format (`\\d{4}-\\d{2}-\\d{2}T...` unanchored,
as JSON Schema says) no such walk ends: it writes "0" forever, and random orders never spell the
pattern (Github_easy o12621 on the default model ended on length unparsed). A witness is a short
string matching the pattern (or valid for the format); the walk then tries suffixes of it: an anchored
pattern half written continues with the suffix that matches its progress, an unanchored one is matched
again in full.

`witnesses(spec)` lists them for a JSON-schema or regex spec: the patterns' shortest matches (our own
walk over `re`'s parse tree: the fewest repeats, the shortest branch, a plain printable character for
each class), the formats' fixed examples. Characters a JSON string would need to escape are avoided.
"""
from __future__ import annotations

import json
import re
from typing import Any, Iterator, Optional

try:  # Python >= 3.11
    import re._constants as _c  # type: ignore[import-not-found]
    import re._parser as _parser  # type: ignore[import-not-found]
except ImportError:  # pragma: no cover - Python 3.10
    import sre_constants as _c  # type: ignore[no-redef]
    import sre_parse as _parser  # type: ignore[no-redef]

FORMAT_EXAMPLES = {
    "date-time": "2000-01-01T00:00:00Z", "date": "2000-01-01", "time": "00:00:00Z", "duration": "P1D",
    "email": "a@a.aa", "hostname": "a", "ipv4": "0.0.0.0", "ipv6": "::1", "uri": "http://a.aa",
    "uuid": "00000000-0000-0000-0000-000000000000",
}
MAX_WITNESSES = 8
MAX_LEN = 64  # bytes: longer witnesses cost more than the budget they save
# Characters tried, in order, for a character class: JSON-string safe, printable.
_PREFERRED = "0aA-_.:/@ TZ+1xz" + "".join(chr(c) for c in range(0x21, 0x7F) if chr(c) not in '"\\')


def witnesses(kind: str, value: Any) -> tuple[bytes, ...]:
    """Up to MAX_WITNESSES short strings (UTF-8) for the patterns/formats of a json_schema (normalized
    JSON text or a dict) or for a regex; () for other kinds or when none is found."""
    found: list[str] = []
    if kind == "regex" and isinstance(value, str):
        found += [w for w in [shortest_match(value)] if w]
    elif kind == "json_schema":
        try:
            schema = json.loads(value) if isinstance(value, str) else value
        except ValueError:
            return ()
        for key, item in _walk(schema):
            w = shortest_match(item) if key == "pattern" else FORMAT_EXAMPLES.get(item)
            if w:
                found.append(w)
    out: list[bytes] = []
    for w in found:
        b = w.encode("utf-8")
        if b not in out and len(b) <= MAX_LEN:
            out.append(b)
    return tuple(out[:MAX_WITNESSES])


def _walk(node: Any) -> Iterator[tuple[str, str]]:
    """(keyword, value) of every `pattern` / `format` string and every patternProperties key."""
    if isinstance(node, dict):
        for k, v in node.items():
            if k in ("pattern", "format") and isinstance(v, str):
                yield k, v
            elif k == "patternProperties" and isinstance(v, dict):
                for p, sub in v.items():
                    yield "pattern", p
                    yield from _walk(sub)
            elif k not in ("enum", "const", "default", "examples"):
                yield from _walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from _walk(v)


def matches_every_string(pattern: str) -> bool:
    """True when `pattern` (search semantics) matches every string: it matches the empty string and has
    no assertion (anchors, word boundaries, lookaround) nor backreference, so the empty match at
    position 0 of any string is a match. False when unsure (a syntax Python's `re` does not parse)."""
    try:
        tree = _parser.parse(pattern)
        return re.search(pattern, "") is not None and not _has_assertion(tree)
    except Exception:  # noqa: BLE001
        return False


def _has_assertion(items: Any) -> bool:
    for op, av in items:
        if op in (_c.AT, _c.ASSERT, _c.ASSERT_NOT, _c.GROUPREF, getattr(_c, "GROUPREF_EXISTS", None)):
            return True
        if op in (_c.MAX_REPEAT, _c.MIN_REPEAT, getattr(_c, "POSSESSIVE_REPEAT", None)) and _has_assertion(av[2]):
            return True
        if op is _c.SUBPATTERN and _has_assertion(av[-1]):
            return True
        if op is _c.BRANCH and any(_has_assertion(b) for b in av[1]):
            return True
        if hasattr(_c, "ATOMIC_GROUP") and op is _c.ATOMIC_GROUP and _has_assertion(av):
            return True
    return False


def shortest_match(pattern: str) -> Optional[str]:
    """A short string matching `pattern` (search semantics, so anchors are dropped), or None when the
    pattern is not Python `re` syntax or needs a construct we do not walk (lookaround, backrefs)."""
    try:
        tree = _parser.parse(pattern)
        text = _seq(tree)
    except Exception:  # noqa: BLE001 - a Rust-only syntax, an unsupported node: no witness
        return None
    if text is None:
        return None
    try:
        return text if re.search(pattern, text) else None
    except re.error:
        return None


def _seq(items: Any) -> Optional[str]:
    parts = []
    for op, av in items:
        s = _node(op, av)
        if s is None:
            return None
        parts.append(s)
    return "".join(parts)


def _node(op: Any, av: Any) -> Optional[str]:
    if op is _c.LITERAL:
        return chr(av)
    if op is _c.NOT_LITERAL:
        return next((ch for ch in _PREFERRED if ord(ch) != av), None)
    if op is _c.ANY:
        return "0"
    if op is _c.IN:
        return next((ch for ch in _PREFERRED if _in_class(av, ch)), None)
    if op in (_c.MAX_REPEAT, _c.MIN_REPEAT, getattr(_c, "POSSESSIVE_REPEAT", None)):
        lo, _hi, sub = av
        one = _seq(sub)
        return None if one is None else one * lo
    if op is _c.SUBPATTERN:
        return _seq(av[-1])
    if op is _c.BRANCH:
        options = [s for s in (_seq(b) for b in av[1]) if s is not None]
        return min(options, key=len) if options else None
    if op is _c.AT:
        return ""
    if hasattr(_c, "ATOMIC_GROUP") and op is _c.ATOMIC_GROUP:
        return _seq(av)
    return None  # lookaround, backreferences, conditionals


def _in_class(items: Any, ch: str) -> bool:
    negate = bool(items) and items[0][0] is _c.NEGATE
    hit = False
    for op, av in items[1:] if negate else items:
        if op is _c.LITERAL:
            hit = hit or ord(ch) == av
        elif op is _c.RANGE:
            hit = hit or av[0] <= ord(ch) <= av[1]
        elif op is _c.CATEGORY:
            hit = hit or _category(av, ch)
    return hit != negate


def _category(cat: Any, ch: str) -> bool:
    name = str(cat)
    inner = ch.isdigit() if "DIGIT" in name else (ch.isalnum() or ch == "_") if "WORD" in name else \
        ch.isspace() if "SPACE" in name else False
    return inner != ("_NOT_" in name)

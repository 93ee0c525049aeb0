"""An incremental JSON scanner over the bytes a matcher accepts: where each value starts, its JSON path,
and the moment it closes. The semantic guards (grammars/guards.py) check a value when it closes and
roll back to where it (or its last child) started.

The grammar already guarantees the bytes are a prefix of valid JSON, so the scanner only tracks
structure; it never validates. Offsets are byte offsets into the output so far.

Example:
    >>> t = JsonTracker()
    >>> [(c.path, c.start, c.end) for c in t.feed(b'{"a":[1,2]}')]
    [(('a', 0), 6, 7), (('a', 1), 8, 9), (('a',), 5, 10), ((), 0, 11)]
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Optional, Union

PathElem = Union[str, int]
_ATOM = frozenset(b"0123456789+-.eEtruefalsn")
_WS = frozenset(b" \t\r\n")


@dataclass
class Closed:
    """A value that just closed: bytes [start, end) of the output; `last_child` = start byte of its
    last element/member value (containers with children), else None."""

    path: tuple[PathElem, ...]
    start: int
    end: int
    last_child: Optional[int] = None
    siblings: tuple[tuple[int, int], ...] = ()  # array elements: the spans of the elements before it


@dataclass
class _Frame:
    kind: str  # "{" or "["
    path: tuple[PathElem, ...]
    start: int
    index: int = 0  # arrays: the next element's index
    key: Optional[str] = None  # objects: the key of the member being read
    expect_key: bool = True  # objects: the next string is a key
    last_child: Optional[int] = None
    children: list[tuple[int, int]] = field(default_factory=list)  # arrays: spans of the closed elements


@dataclass
class JsonTracker:
    data: bytearray = field(default_factory=bytearray)
    stack: list[_Frame] = field(default_factory=list)
    # the scalar being read: (kind '"' or 'a' (atom), start byte, is_key, path)
    scalar: Optional[tuple[str, int, bool, tuple[PathElem, ...]]] = None
    escape: bool = False
    done: bool = False  # the root value closed

    def open_starts(self) -> list[tuple[tuple[PathElem, ...], int]]:
        """(path, start byte) of every open value, outermost first (containers, then the scalar)."""
        out = [(f.path, f.start) for f in self.stack]
        if self.scalar is not None and not self.scalar[2]:
            out.append((self.scalar[3], self.scalar[1]))
        return out

    def _value_path(self) -> tuple[PathElem, ...]:
        if not self.stack:
            return ()
        f = self.stack[-1]
        return f.path + ((f.index,) if f.kind == "[" else (f.key or "",))

    def _child_started(self, start: int) -> None:
        if self.stack:
            self.stack[-1].last_child = start

    def feed(self, chunk: bytes) -> list[Closed]:
        out: list[Closed] = []
        for b in chunk:
            i = len(self.data)
            self.data.append(b)
            sc = self.scalar
            if sc is not None and sc[0] == '"':
                if self.escape:
                    self.escape = False
                elif b == 0x5C:  # backslash
                    self.escape = True
                elif b == 0x22:  # closing quote
                    self.scalar = None
                    if sc[2]:
                        try:
                            self.stack[-1].key = json.loads(bytes(self.data[sc[1]:i + 1]).decode("utf-8"))
                        except ValueError:
                            self.stack[-1].key = ""
                        self.stack[-1].expect_key = False
                    else:
                        out.append(self._close(sc[3], sc[1], i + 1))
                continue
            if sc is not None:  # an atom (number/true/false/null) ends at the first other byte
                if b in _ATOM:
                    continue
                self.scalar = None
                out.append(self._close(sc[3], sc[1], i))
            if b in _WS:
                continue
            if b == 0x22:
                is_key = bool(self.stack) and self.stack[-1].kind == "{" and self.stack[-1].expect_key
                path = () if is_key else self._value_path()
                if not is_key:
                    self._child_started(i)
                self.scalar = ('"', i, is_key, path)
            elif b in (0x7B, 0x5B):  # { [
                path = self._value_path()
                self._child_started(i)
                self.stack.append(_Frame(chr(b), path, i))
            elif b in (0x7D, 0x5D):  # } ]
                if self.stack:
                    f = self.stack.pop()
                    out.append(self._close(f.path, f.start, i + 1, f.last_child))
            elif b == 0x2C:  # ,
                if self.stack:
                    f = self.stack[-1]
                    if f.kind == "[":
                        f.index += 1
                    else:
                        f.expect_key, f.key = True, None
            elif b == 0x3A:  # :
                pass
            else:
                self._child_started(i)
                self.scalar = ("a", i, False, self._value_path())
        return out

    def finish(self) -> list[Closed]:
        """The output ended: close a trailing atom (a top-level number)."""
        sc = self.scalar
        if sc is not None and sc[0] == "a":
            self.scalar = None
            return [self._close(sc[3], sc[1], len(self.data))]
        return []

    def _close(self, path: tuple[PathElem, ...], start: int, end: int, last_child: Optional[int] = None) -> Closed:
        if not self.stack:
            self.done = True
            return Closed(path, start, end, last_child)
        siblings: tuple[tuple[int, int], ...] = ()
        if self.stack[-1].kind == "[":
            siblings = tuple(self.stack[-1].children)
            self.stack[-1].children.append((start, end))
        return Closed(path, start, end, last_child, siblings)

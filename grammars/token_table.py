"""TokenTable: token id -> its bytes (None for a special token), every token's bytes in one blob.

A tuple of 49,152 `bytes` objects holds ~45 bytes per token in Python object headers and pointers (2.3 MB
resident for the default model's vocabulary, benchmarks/bench_memory.py); the blob and its int32 end
offsets hold the token's bytes plus 4. Reads return a new `bytes` (a slice of the blob): ~100 ns, done
per token at decode time and once per token when a backend builds its own tables.

    >>> t = TokenTable([b"a", None, b" {"])
    >>> len(t), t[2], t[1], list(t), t.max_len
    (3, b' {', None, [b'a', None, b' {'], 2)
"""
from __future__ import annotations

from array import array
from typing import Iterable, Iterator, Optional, Sequence, Union, overload


class TokenTable(Sequence[Optional[bytes]]):
    """An immutable sequence of `bytes | None`, stored as one blob + end offsets + None flags."""

    __slots__ = ("_blob", "_ends", "_none", "max_len")

    def __init__(self, items: Iterable[Optional[bytes]]) -> None:
        parts: list[bytes] = []
        ends = array("i")
        none = bytearray()
        end = longest = 0
        for b in items:
            none.append(b is None)
            if b is not None:
                parts.append(b)
                end += len(b)
                longest = max(longest, len(b))
            ends.append(end)
        self._blob = b"".join(parts)
        self._ends = ends  # _ends[i]: where token i's bytes end in the blob; they start at _ends[i - 1] (0 first)
        self._none = bytes(none)
        self.max_len = longest  # bytes of the longest token

    def __len__(self) -> int:
        return len(self._ends)

    @overload
    def __getitem__(self, i: int) -> Optional[bytes]: ...

    @overload
    def __getitem__(self, i: slice) -> list[Optional[bytes]]: ...

    def __getitem__(self, i: Union[int, slice]) -> Union[Optional[bytes], list[Optional[bytes]]]:
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self._ends)
            if i < 0:
                raise IndexError("token id out of range")
        if self._none[i]:  # (IndexError past the end, as a tuple's)
            return None
        return self._blob[self._ends[i - 1] if i else 0:self._ends[i]]

    def __iter__(self) -> Iterator[Optional[bytes]]:
        start = 0
        for end, none in zip(self._ends, self._none):
            yield None if none else self._blob[start:end]
            start = end

    def __eq__(self, other: object) -> bool:
        if isinstance(other, TokenTable):
            return (self._blob, self._ends, self._none) == (other._blob, other._ends, other._none)
        return isinstance(other, Sequence) and len(other) == len(self) and all(a == b for a, b in zip(self, other))

    def __hash__(self) -> int:
        return hash((self._blob, self._ends.tobytes(), self._none))

    def __repr__(self) -> str:
        return f"TokenTable({len(self)} tokens, {len(self._blob)} bytes)"

    def join(self, token_ids: Sequence[int]) -> bytes:
        """The concatenated bytes of `token_ids` (ids past the end and None tokens contribute nothing)."""
        n = len(self._ends)
        return b"".join(self[t] or b"" for t in token_ids if t < n)

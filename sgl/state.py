"""`ProgramState` (the `s` of a program) and `ProgramStateGroup` (what `s.fork(n)` returns).

    >>> import sgl
    >>> @sgl.function
    ... def tips(s, topic):
    ...     s += f"Two tips about {topic}:\\n"
    ...     forks = s.fork(2)
    ...     forks += lambda i: f"Tip {i + 1}:" + sgl.gen("tip", max_tokens=16, stop="\\n")
    ...     forks.join()                      # s["tip"] is now a list of 2 strings
    ...     s += "Summary:" + sgl.gen("summary", max_tokens=32)
"""

from __future__ import annotations

import asyncio
import sys
from contextlib import contextmanager
from typing import Any, AsyncIterator, Callable, Iterator, Optional, Union

from sgl.interpreter import ProgramError, StreamExecutor
from sgl.ir import SglExpr, as_expr, SglRoleBegin, SglRoleEnd, SglVarScopeBegin, SglVarScopeEnd
from sgl.sampling import parse_value


def _origin(depth: int = 2) -> str:
    """file:line of the program code that appended an expression (for error notes)."""
    f = sys._getframe(depth)
    return f"{f.f_code.co_filename}:{f.f_lineno}"


class ProgramState:
    """The running state of a program: append with `+=`, read variables with `s["name"]`."""

    def __init__(self, executor: StreamExecutor) -> None:
        self.stream_executor = executor
        self.ret_value: Any = None

    # ---- appending ---------------------------------------------------------------------------------
    def __iadd__(self, other: Any) -> "ProgramState":
        self.stream_executor.submit(other, _origin())
        return self

    def _role(self, role: str, expr: Any) -> Any:
        if expr is not None:
            self.stream_executor.submit(SglRoleBegin(role) + as_expr(expr) + SglRoleEnd(role), _origin(3))
            return None
        return self._role_scope(role)

    @contextmanager
    def _role_scope(self, role: str) -> Iterator[None]:
        self.stream_executor.submit(SglRoleBegin(role), _origin(3))
        yield
        self.stream_executor.submit(SglRoleEnd(role), _origin(3))

    def system(self, expr: Any = None) -> Any:
        """`s.system("...")` appends a system turn; `with s.system():` wraps what is appended inside."""
        return self._role("system", expr)

    def user(self, expr: Any = None) -> Any:
        return self._role("user", expr)

    def assistant(self, expr: Any = None) -> Any:
        return self._role("assistant", expr)

    @contextmanager
    def var_scope(self, name: str) -> Iterator[None]:
        """Everything appended inside the block becomes variable `name` (as text)."""
        self.stream_executor.submit(SglVarScopeBegin(name), _origin(3))
        yield
        self.stream_executor.submit(SglVarScopeEnd(name), _origin(3))

    # ---- forks -----------------------------------------------------------------------------------------
    def fork(self, n: int = 1) -> "ProgramStateGroup":
        """n states that continue from this one's text; `join()` gathers their new variables."""
        return ProgramStateGroup([ProgramState(x) for x in self.stream_executor.fork(n)], self)

    @contextmanager
    def copy(self) -> Iterator["ProgramState"]:
        group = self.fork(1)
        try:
            yield group[0]
        finally:
            group.join()

    # ---- reading -------------------------------------------------------------------------------------
    def text(self) -> str:
        self.stream_executor.sync()
        return self.stream_executor.text_

    def messages(self) -> list[dict[str, str]]:
        self.stream_executor.sync()
        return list(self.stream_executor.messages_)

    def sync(self) -> None:
        self.stream_executor.sync()

    def error(self) -> Optional[BaseException]:
        """The error that stopped this state, or None (SGLang's API; we also raise it)."""
        self.stream_executor.wait()
        return self.stream_executor.error

    def get_var(self, name: str) -> Any:
        return self.stream_executor.get_var(name)

    def set_var(self, name: str, value: Any) -> None:
        self.stream_executor.set_var(name, value)

    def get_meta_info(self, name: str) -> Any:
        """What the runtime reported for variable `name`: finish_reason, token counts, logprobs, ..."""
        self.stream_executor.get_var(name)
        return self.stream_executor.meta_info.get(name)

    def parsed(self, name: str) -> Any:
        """Variable `name` as a value: an int/float/bool for `dtype=`, the JSON object (or pydantic
        instance) for `json_schema=`. A list when the variable is a list (forks, n > 1)."""
        value = self.get_var(name)
        dtype, schema = self.stream_executor.parse_as.get(name, (None, None))
        if dtype is None and schema is None:
            raise ProgramError(f"variable {name!r} was not generated with dtype= or json_schema=: nothing to parse")
        if isinstance(value, list):
            return [parse_value(v, dtype, schema) for v in value]
        return parse_value(value, dtype, schema)

    def __getitem__(self, name: str) -> Any:
        return self.get_var(name)

    def __setitem__(self, name: str, value: Any) -> None:
        self.set_var(name, value)

    def __contains__(self, name: str) -> bool:
        self.stream_executor.sync()
        return name in self.stream_executor.variables

    # ---- streaming -----------------------------------------------------------------------------------
    def text_iter(self, var_name: Optional[str] = None) -> Iterator[str]:
        """Yield the text (or variable `var_name`) piece by piece as it is generated (`run(stream=True)`);
        without streaming, yield it once when done."""
        ex = self.stream_executor
        if not ex.stream:
            yield self.text() if var_name is None else self.get_var(var_name)
            return
        yield from ex.iter_text(var_name)

    async def text_async_iter(self, var_name: Optional[str] = None,
                              return_meta_data: bool = False) -> AsyncIterator[Any]:
        """`async for piece in state.text_async_iter():` (the blocking reads run in a thread)."""
        it = self.text_iter(var_name)
        done = object()
        while True:
            piece = await asyncio.to_thread(next, it, done)
            if piece is done:
                return
            if return_meta_data:
                yield piece, (self.stream_executor.meta_info.get(var_name) if var_name else None)
            else:
                yield piece

    def __repr__(self) -> str:
        return f"ProgramState({self.text()!r})"


class ProgramStateGroup:
    """The forks of a state. `forks += x` appends x to every fork (a callable gets the fork index)."""

    def __init__(self, states: list[ProgramState], parent: ProgramState) -> None:
        self.states = states
        self.parent = parent

    def __getitem__(self, i: int) -> ProgramState:
        return self.states[i]

    def __setitem__(self, i: int, value: ProgramState) -> None:
        if value is not self.states[i]:  # `forks[i] += x` assigns the same object back
            raise ProgramError("forks cannot be replaced")

    def __len__(self) -> int:
        return len(self.states)

    def __iter__(self) -> Iterator[ProgramState]:
        return iter(self.states)

    def __iadd__(self, other: Union[str, SglExpr, Callable[[int], Any], list, tuple]) -> "ProgramStateGroup":
        origin = _origin()
        for i, st in enumerate(self.states):
            if callable(other) and not isinstance(other, SglExpr):
                item = other(i)
            elif isinstance(other, (list, tuple)):
                if len(other) != len(self.states):
                    raise ProgramError(f"forks += list: expected {len(self.states)} items, got {len(other)}")
                item = other[i]
            else:
                item = other
            st.stream_executor.submit(item, origin)
        return self

    def join(self, mode: str = "gather_variable") -> None:
        """Wait for every fork. "gather_variable": each variable the forks created becomes a list on
        the parent (in fork order). "concate_and_append": append the forks' new text to the parent."""
        parent = self.parent.stream_executor
        for st in self.states:
            st.stream_executor.sync()
        if mode == "gather_variable":
            parent.sync()
            before = set(parent.variables)
            for st in self.states:
                ex = st.stream_executor
                for k in ex.variables:
                    if k in before:
                        continue
                    parent.variables.setdefault(k, []).append(ex.variables[k])
                    parent.meta_info.setdefault(k, []).append(ex.meta_info.get(k))
                    parent.parse_as.setdefault(k, ex.parse_as.get(k, (None, None)))
        elif mode == "concate_and_append":
            self.parent.stream_executor.submit("".join(st.stream_executor.text_[st.stream_executor.fork_start:]
                                                       for st in self.states), _origin())
        else:
            raise ProgramError(f"join mode must be 'gather_variable' or 'concate_and_append' (got {mode!r})")
        for st in self.states:
            st.stream_executor.end()

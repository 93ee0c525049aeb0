"""Tracing a program into IR without running a model, and what the compiler does with the trace.

`fn.trace(**kwargs)` runs the program function on a `TracerState`: appended expressions are
recorded, arguments not given are `SglArgument` placeholders and variables read back are
`SglVariable` placeholders (both survive f-strings, see `sgl.ir.split_markers`).

The compiler pass used at run time is `constant_prefix`: the leading nodes that do not depend on any
argument or generation (constant text and role markup). `run_batch` renders that prefix with the
backend's chat template and prefills it once, so every program in the batch reuses its KV from the
radix cache instead of each computing it (forks get the same treatment at `s.fork()`, from the
parent's actual text).

    >>> print(fn.trace())                                           # doctest: +SKIP
    program qa(question)
        0* SglRoleBegin('user')
        1* SglConstantText('Answer briefly: ')
        2  SglArgument('question')
      ...
    constant prefix: nodes 0-1 (prefilled once per batch)
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional

from sgl.ir import (SglConstantText, SglExpr, SglFork, SglGen, SglJoin, SglRoleBegin, SglRoleEnd, SglSelect,
                    SglVariable, SglVarScopeBegin, SglVarScopeEnd, as_expr, split_markers)

_CONSTANT = (SglConstantText, SglRoleBegin, SglRoleEnd)


class TracingError(RuntimeError):
    """The program could not be traced (it computed on a value only known at run time)."""


class TracerState:
    """Stands in for `ProgramState` while tracing: records nodes, never calls a model."""

    def __init__(self, nodes: list[SglExpr], fork_index: Optional[int] = None) -> None:
        self.nodes = nodes
        self.fork_index = fork_index
        self.ret_value: Any = None

    def __iadd__(self, other: Any) -> "TracerState":
        for node in as_expr(other).flatten():
            if isinstance(node, SglConstantText):
                self.nodes.extend(split_markers(node.value))
            else:
                self.nodes.append(node)
        return self

    def _role(self, role: str, expr: Any) -> Any:
        if expr is not None:
            self += SglRoleBegin(role) + as_expr(expr) + SglRoleEnd(role)
            return None
        return self._role_scope(role)

    @contextmanager
    def _role_scope(self, role: str) -> Iterator[None]:
        self.nodes.append(SglRoleBegin(role))
        yield
        self.nodes.append(SglRoleEnd(role))

    def system(self, expr: Any = None) -> Any:
        return self._role("system", expr)

    def user(self, expr: Any = None) -> Any:
        return self._role("user", expr)

    def assistant(self, expr: Any = None) -> Any:
        return self._role("assistant", expr)

    @contextmanager
    def var_scope(self, name: str) -> Iterator[None]:
        self.nodes.append(SglVarScopeBegin(name))
        yield
        self.nodes.append(SglVarScopeEnd(name))

    def fork(self, n: int = 1) -> "TracerGroup":
        node = SglFork(int(n))
        self.nodes.append(node)
        return TracerGroup([TracerState(node.branches[i], i) for i in range(node.n)], self)

    @contextmanager
    def copy(self) -> Iterator["TracerState"]:
        group = self.fork(1)
        yield group[0]
        group.join()

    def __getitem__(self, name: str) -> SglVariable:
        return SglVariable(name, self.fork_index)

    def __setitem__(self, name: str, value: Any) -> None:
        pass

    def __contains__(self, name: str) -> bool:
        return True

    def get_var(self, name: str) -> SglVariable:
        return self[name]

    def set_var(self, name: str, value: Any) -> None:
        pass

    def parsed(self, name: str) -> SglVariable:
        return self[name]

    def get_meta_info(self, name: str) -> dict[str, Any]:
        return {}

    def text(self) -> SglVariable:
        return SglVariable("<text>", self.fork_index)

    def messages(self) -> list[dict[str, str]]:
        return []

    def sync(self) -> None:
        pass

    def error(self) -> None:
        return None


class TracerGroup:
    def __init__(self, states: list[TracerState], parent: TracerState) -> None:
        self.states = states
        self.parent = parent

    def __getitem__(self, i: int) -> TracerState:
        return self.states[i]

    def __setitem__(self, i: int, value: TracerState) -> None:
        pass

    def __len__(self) -> int:
        return len(self.states)

    def __iter__(self) -> Iterator[TracerState]:
        return iter(self.states)

    def __iadd__(self, other: Any) -> "TracerGroup":
        for i, st in enumerate(self.states):
            if callable(other) and not isinstance(other, SglExpr):
                st += other(i)
            elif isinstance(other, (list, tuple)):
                st += other[i]
            else:
                st += other
        return self

    def join(self, mode: str = "gather_variable") -> None:
        self.parent.nodes.append(SglJoin(mode))


class ProgramTrace:
    """The IR of one program: `nodes` (forks hold their branches), printable."""

    def __init__(self, name: str, arg_names: list[str], nodes: list[SglExpr], complete: bool = True) -> None:
        self.name = name
        self.arg_names = arg_names
        self.nodes = nodes
        self.complete = complete  # False when tracing stopped early (only a prefix was recorded)

    @property
    def constant_prefix(self) -> list[SglExpr]:
        """The leading nodes that depend on no argument and no generation."""
        out = []
        for node in self.nodes:
            if not isinstance(node, _CONSTANT):
                break
            out.append(node)
        return out

    def gens(self) -> list[SglExpr]:
        """Every SglGen / SglSelect, fork branches included, in program order."""
        found: list[SglExpr] = []

        def walk(nodes: list[SglExpr]) -> None:
            for n in nodes:
                if isinstance(n, (SglGen, SglSelect)):
                    found.append(n)
                elif isinstance(n, SglFork):
                    for b in n.branches:
                        walk(b)

        walk(self.nodes)
        return found

    def __str__(self) -> str:
        k = len(self.constant_prefix)
        lines = [f"program {self.name}({', '.join(self.arg_names)})"]
        for i, node in enumerate(self.nodes):
            lines.append(f"  {i:>3}{'*' if i < k else ' '} {node!r}")
            if isinstance(node, SglFork):
                for b, branch in enumerate(node.branches):
                    lines.extend(f"         [{b}] {n!r}" for n in branch)
        if k:
            lines.append(f"constant prefix: nodes 0-{k - 1} (prefilled once per batch)")
        else:
            lines.append("constant prefix: none")
        if not self.complete:
            lines.append("(tracing stopped early: the program computes on run-time values)")
        return "\n".join(lines)

    __repr__ = __str__


def trace_function(func: Callable[..., Any], name: str, arg_names: list[str], arguments: dict[str, Any],
                   strict: bool = True) -> ProgramTrace:
    """Run `func` on a TracerState. Missing arguments become SglArgument placeholders.

    strict=False (the compiler's use) keeps the nodes recorded before the program failed on a
    placeholder; strict=True raises a TracingError that says how to fix it.
    """
    from sgl.ir import SglArgument

    args = {n: arguments[n] if n in arguments else SglArgument(n) for n in arg_names}
    state = TracerState([])
    try:
        state.ret_value = func(state, **args)
    except Exception as e:  # noqa: BLE001 - user code computing on placeholders
        if strict:
            raise TracingError(f"cannot trace {name}: {type(e).__name__}: {e}. The program computes on a value "
                               f"only known at run time; pass concrete values, e.g. {name}.trace(arg=...)") from e
        return ProgramTrace(name, arg_names, state.nodes, complete=False)
    return ProgramTrace(name, arg_names, state.nodes)

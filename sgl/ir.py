"""The intermediate representation of a DSL program: plain nodes, no backend, no execution.

A program appends expressions to its state (`s += expr`); `a + b` of expressions (or of a string
and an expression) builds an `SglExprList`. The interpreter executes nodes; the tracer records them.

    >>> e = "Q: " + SglGen("answer", GenParams(max_new_tokens=8))
    >>> e
    SglExprList([SglConstantText('Q: '), SglGen('answer', max_new_tokens=8)])
"""

from __future__ import annotations

from typing import Any, Optional, Union

from sgl.sampling import GenParams

# NOTE: a tracer placeholder formats as this marker inside f-strings and `str()`, so that text like
# f"Q: {question}" can be split back into SglConstantText and SglArgument nodes.
MARK = "\x1f"


class SglExpr:
    """Base of every node. `+` concatenates into an SglExprList."""

    def __add__(self, other: Union[str, "SglExpr"]) -> "SglExprList":
        return SglExprList.concat(self, as_expr(other))

    def __radd__(self, other: Union[str, "SglExpr"]) -> "SglExprList":
        return SglExprList.concat(as_expr(other), self)

    def flatten(self) -> list["SglExpr"]:
        return [self]


def as_expr(x: Any) -> SglExpr:
    """A string (or anything printable) becomes constant text; expressions pass through."""
    if isinstance(x, SglExpr):
        return x
    if x is None:
        raise TypeError("cannot append None to a program state")
    return SglConstantText(str(x))


class SglExprList(SglExpr):
    def __init__(self, exprs: list[SglExpr]) -> None:
        self.exprs = exprs

    @staticmethod
    def concat(a: SglExpr, b: SglExpr) -> "SglExprList":
        return SglExprList(a.flatten() + b.flatten())

    def flatten(self) -> list[SglExpr]:
        return [y for x in self.exprs for y in x.flatten()]

    def __repr__(self) -> str:
        return f"SglExprList({self.exprs!r})"


class SglConstantText(SglExpr):
    def __init__(self, value: str) -> None:
        self.value = value

    def __repr__(self) -> str:
        return f"SglConstantText({self.value!r})"


class SglGen(SglExpr):
    """Generate text into variable `name`. `parse_as` is the pydantic class / schema / dtype that
    `state.parsed(name)` uses to turn the text into a value."""

    def __init__(self, name: Optional[str], params: GenParams, parse_as: Any = None) -> None:
        self.name = name
        self.params = params
        self.parse_as = parse_as

    def __repr__(self) -> str:
        set_fields = ", ".join(f"{k}={_short(getattr(self.params, k))}" for k in GenParams.names()
                               if getattr(self.params, k) is not None)
        return f"SglGen({self.name!r}{', ' + set_fields if set_fields else ''})"


class SglSelect(SglExpr):
    """Pick one of `choices` by its likelihood under the model (see sgl.choices)."""

    def __init__(self, name: Optional[str], choices: list[str], temperature: float, choices_method: Any,
                 model: Optional[str] = None, lora_path: Optional[str] = None) -> None:
        self.name = name
        self.model = model  # a served model name on a multi-model server; None = the server's default
        self.lora_path = lora_path  # a loaded LoRA adapter's name; None = the base model
        self.choices = list(choices)
        self.temperature = temperature
        self.choices_method = choices_method

    def __repr__(self) -> str:
        model = f", model={self.model!r}" if self.model is not None else ""
        model += f", lora_path={self.lora_path!r}" if self.lora_path is not None else ""
        return f"SglSelect({self.name!r}, choices={self.choices!r}, method={self.choices_method!r}{model})"


class SglRoleBegin(SglExpr):
    def __init__(self, role: str) -> None:
        self.role = role

    def __repr__(self) -> str:
        return f"SglRoleBegin({self.role!r})"


class SglRoleEnd(SglExpr):
    def __init__(self, role: str) -> None:
        self.role = role

    def __repr__(self) -> str:
        return f"SglRoleEnd({self.role!r})"


class SglVarScopeBegin(SglExpr):
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"SglVarScopeBegin({self.name!r})"


class SglVarScopeEnd(SglExpr):
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"SglVarScopeEnd({self.name!r})"


class _Placeholder(SglExpr):
    """Stands for a value unknown while tracing; formats as a marker the tracer splits on."""

    kind = ""

    def __init__(self, name: str) -> None:
        self.name = name

    def _marker(self) -> str:
        return f"{MARK}{self.kind}:{self.name}{MARK}"

    def __str__(self) -> str:
        return self._marker()

    def __format__(self, spec: str) -> str:
        return self._marker()

    def __bool__(self) -> bool:  # `if arg:` in a traced program takes the branch
        return True


class SglArgument(_Placeholder):
    """A program argument not given to `trace()`."""

    kind = "arg"

    def __repr__(self) -> str:
        return f"SglArgument({self.name!r})"


class SglVariable(_Placeholder):
    """The value of variable `name` (generated earlier, or by fork `fork_index`), while tracing."""

    kind = "var"

    def __init__(self, name: str, fork_index: Optional[int] = None) -> None:
        super().__init__(name if fork_index is None else f"{name}@{fork_index}")
        self.var_name = name
        self.fork_index = fork_index

    def __repr__(self) -> str:
        where = "" if self.fork_index is None else f", fork={self.fork_index}"
        return f"SglVariable({self.var_name!r}{where})"


class SglFork(SglExpr):
    """`s.fork(n)` while tracing; `branches[i]` are the nodes appended to fork i."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.branches: list[list[SglExpr]] = [[] for _ in range(n)]

    def __repr__(self) -> str:
        return f"SglFork({self.n})"


class SglJoin(SglExpr):
    def __init__(self, mode: str) -> None:
        self.mode = mode

    def __repr__(self) -> str:
        return f"SglJoin({self.mode!r})"


def _short(v: Any, limit: int = 60) -> str:
    r = repr(v)
    return r if len(r) <= limit else r[: limit - 3] + "..."


def split_markers(text: str) -> list[SglExpr]:
    """Split text containing placeholder markers back into constant text and placeholders.

    >>> split_markers(f"Q: {SglArgument('q')}?")
    [SglConstantText('Q: '), SglArgument('q'), SglConstantText('?')]
    """
    if MARK not in text:
        return [SglConstantText(text)] if text else []
    out: list[SglExpr] = []
    parts = text.split(MARK)
    # NOTE: markers come in pairs, so odd-indexed parts are "kind:name" payloads.
    for i, part in enumerate(parts):
        if i % 2 == 0:
            if part:
                out.append(SglConstantText(part))
            continue
        kind, _, name = part.partition(":")
        if kind == "arg":
            out.append(SglArgument(name))
        else:
            var, _, idx = name.partition("@")
            out.append(SglVariable(var, int(idx) if idx else None))
    return out

"""Executing a program: one `StreamExecutor` per state (and per fork), each on its own worker thread.

`s += expr` queues the expression and returns at once; reading a variable, `s.text()` or the end of
`run()` waits for the queue. So `for f in forks: f += gen(...)` sends every fork's request without
waiting, and the runtime batches them.

Errors: an exception in the worker (a bad parameter, a server error) stops that state's queue and is
re-raised in the caller at its next sync point, with a note naming the expression and the program
line that appended it. An exception in the program function itself propagates unchanged.
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Iterator, Optional

from sgl.backends.base import Backend, Prompt
from sgl.chat_template import ChatTemplate
from sgl.choices import resolve_choices_method
from sgl.ir import (SglArgument, SglConstantText, SglExpr, SglGen, SglRoleBegin, SglRoleEnd, SglSelect,
                    SglVariable, SglVarScopeBegin, SglVarScopeEnd, as_expr)
from sgl.sampling import GenParams


class ProgramError(RuntimeError):
    """A program used the DSL wrongly (nested roles, an unknown variable, ...)."""


class StreamExecutor:
    """The state of one program (or fork) and the worker that advances it."""

    def __init__(self, backend: Backend, defaults: GenParams, stream: bool = False, name: str = "program",
                 chat_template: Optional[ChatTemplate] = None, threaded: bool = True) -> None:
        self.backend = backend
        self.defaults = defaults
        self.stream = stream
        self.name = name
        self._template = chat_template
        self.text_ = ""
        self.messages_: list[dict[str, str]] = []
        self.variables: dict[str, Any] = {}
        self.meta_info: dict[str, Any] = {}
        self.parse_as: dict[str, tuple[Optional[str], Any]] = {}  # var -> (dtype, schema) for `parsed`
        self.cur_role: Optional[str] = None
        self._role_begin = 0
        self._scopes: dict[str, int] = {}
        self.fork_start = 0  # len(text_) when this executor was forked from its parent
        self.children: list[StreamExecutor] = []
        self.error: Optional[BaseException] = None
        self.finished = False
        self._ended = False
        self._var_events: dict[str, threading.Event] = {}
        self._cond = threading.Condition()
        self._version = 0  # bumped (under _cond) on every change, for streaming readers
        self._threaded = threaded
        self._queue: "queue.Queue[Optional[tuple[SglExpr, str]]]" = queue.Queue()
        if threaded:
            threading.Thread(target=self._work, name=f"sgl-{name}", daemon=True).start()

    # ---- the program side --------------------------------------------------------------------------
    @property
    def chat_template(self) -> ChatTemplate:
        if self._template is None:
            self._template = self.backend.get_chat_template()
        return self._template

    def submit(self, expr: Any, origin: str = "") -> None:
        if self._ended:
            raise ProgramError(f"program {self.name!r} has finished (or this fork was joined): nothing can be appended")
        for node in as_expr(expr).flatten():
            name = getattr(node, "name", None)
            if isinstance(node, (SglGen, SglSelect, SglVarScopeBegin)) and name is not None:
                self._var_events[name] = threading.Event()
            if self._threaded:
                self._queue.put((node, origin))
            else:
                self._run_one(node, origin)
                self.raise_error()

    def wait(self) -> None:
        """Wait until everything queued so far has run (or was skipped after an error)."""
        if self._threaded:
            self._queue.join()

    def sync(self) -> None:
        """Wait until everything queued so far has run; raise the state's error, if any."""
        self.wait()
        self.raise_error()

    def raise_error(self) -> None:
        if self.error is not None:
            raise self.error

    def fail(self, exc: BaseException) -> None:
        """Stop this state: later expressions are skipped and waiting readers wake up and raise."""
        with self._cond:
            if self.error is None:
                self.error = exc
            for ev in self._var_events.values():
                ev.set()
            self._version += 1
            self._cond.notify_all()

    def end(self) -> None:
        """No more expressions will come (for this state and its forks)."""
        for child in self.children:
            child.end()
        if self._ended:
            return
        self._ended = True
        if self._threaded:
            self._queue.put(None)
        else:
            self._mark_finished()

    def wait_all(self) -> None:
        """Wait for this state and every fork under it; raise the first error found."""
        self.sync()
        for child in self.children:
            child.wait_all()

    def get_var(self, name: str) -> Any:
        ev = self._var_events.get(name)
        if ev is not None:
            ev.wait()
            self.raise_error()
        if name not in self.variables:
            self.sync()
            if name not in self.variables:
                known = ", ".join(sorted(map(str, self.variables))) or "none"
                raise KeyError(f"no variable {name!r} in program {self.name!r} (variables: {known})")
        return self.variables[name]

    def set_var(self, name: str, value: Any) -> None:
        self.variables[name] = value

    def fork(self, n: int) -> list["StreamExecutor"]:
        """n copies of this state, each with its own worker. The shared text is prefilled once first,
        so every fork's first request finds it in the runtime's prefix cache."""
        if n < 1:
            raise ProgramError(f"fork(n) needs n >= 1 (got {n})")
        self.sync()
        if n > 1 and self.text_ and not self.backend.is_chat_model:
            self.backend.prefill([self.text_])
        kids = []
        for _ in range(n):
            k = StreamExecutor(self.backend, self.defaults, self.stream, f"{self.name}.fork", self._template)
            k.text_, k.messages_ = self.text_, list(self.messages_)
            k.variables, k.meta_info, k.parse_as = dict(self.variables), dict(self.meta_info), dict(self.parse_as)
            k.cur_role, k._role_begin, k.fork_start = self.cur_role, self._role_begin, len(self.text_)
            kids.append(k)
        self.children.extend(kids)
        return kids

    # ---- streaming readers ---------------------------------------------------------------------------
    def iter_text(self, var_name: Optional[str] = None) -> Iterator[str]:
        """Yield what is appended to the text (or to variable `var_name`) as it arrives."""
        pos, seen = 0, -1
        while True:
            with self._cond:
                while self._version == seen and not self.finished and self.error is None:
                    self._cond.wait(0.5)
                seen = self._version
                if var_name is None:
                    cur, done = self.text_, self.finished
                else:
                    v = self.variables.get(var_name, "")
                    cur = v if isinstance(v, str) else ""
                    ev = self._var_events.get(var_name)
                    done = self.finished or (ev is not None and ev.is_set())
                err = self.error
            if err is not None:
                raise err
            if len(cur) > pos:
                yield cur[pos:]
                pos = len(cur)
            if done:
                return

    # ---- the worker side -----------------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                if self.error is None:
                    self._run_one(*item)
            finally:
                self._queue.task_done()
                if item is None:
                    self._mark_finished()

    def _mark_finished(self) -> None:
        with self._cond:
            self.finished = True
            self._version += 1
            self._cond.notify_all()

    def _run_one(self, node: SglExpr, origin: str) -> None:
        try:
            self._execute(node)
        except BaseException as e:  # noqa: BLE001 - re-raised in the program's thread
            if hasattr(e, "add_note"):
                e.add_note(f"sgl: in program {self.name!r}, executing {node!r}" + (f", appended at {origin}" if origin else ""))
            self.fail(e)

    def _changed(self) -> None:
        with self._cond:
            self._version += 1
            self._cond.notify_all()

    def _fill(self, text: str) -> None:
        with self._cond:
            self.text_ += text
            self._version += 1
            self._cond.notify_all()

    def _execute(self, node: SglExpr) -> None:
        if isinstance(node, SglConstantText):
            self._fill(node.value)
        elif isinstance(node, SglGen):
            self._gen(node)
        elif isinstance(node, SglSelect):
            self._select(node)
        elif isinstance(node, SglRoleBegin):
            self._role_begin_(node.role)
        elif isinstance(node, SglRoleEnd):
            self._role_end_(node.role)
        elif isinstance(node, SglVarScopeBegin):
            self._scopes[node.name] = len(self.text_)
        elif isinstance(node, SglVarScopeEnd):
            if node.name not in self._scopes:
                raise ProgramError(f"var_scope({node.name!r}) ended but never began")
            self._set(node.name, self.text_[self._scopes.pop(node.name):], None)
        elif isinstance(node, (SglArgument, SglVariable)):
            raise ProgramError(f"{node!r} is a tracing placeholder and cannot run; pass real values")
        else:
            raise ProgramError(f"cannot execute {node!r}")

    def _prompt(self) -> Prompt:
        role_text = self.text_[self._role_begin:] if self.cur_role else ""
        return Prompt(self.text_, list(self.messages_), self.cur_role, role_text)

    def _set(self, name: Optional[str], value: Any, meta: Any) -> None:
        if name is None:
            return
        self.variables[name] = value
        self.meta_info[name] = meta
        ev = self._var_events.get(name)
        if ev is not None:
            ev.set()
        self._changed()

    def _gen(self, node: SglGen) -> None:
        params = node.params.merged(self.defaults)
        if self.cur_role is not None:
            params = params.with_extra_stop(self.chat_template.stop_str)
        if node.name is not None:
            self.parse_as[node.name] = (params.dtype, node.parse_as)
        if self.stream and params.n in (None, 1):
            start = len(self.text_)
            if node.name is not None:
                self.variables[node.name] = ""
            meta: Any = None
            for res in self.backend.generate_stream(self._prompt(), params):
                with self._cond:
                    self.text_ = self.text_[:start] + res.text
                    if node.name is not None:
                        self.variables[node.name] = res.text
                    meta = res.meta_info
                    self._version += 1
                    self._cond.notify_all()
            self._set(node.name, self.variables.get(node.name, ""), meta)
            return
        res = self.backend.generate(self._prompt(), params)
        self._fill(res.text[0] if isinstance(res.text, list) else res.text)
        self._set(node.name, res.text, res.meta_info)

    def _select(self, node: SglSelect) -> None:
        if not node.choices:
            raise ProgramError("select needs at least one choice")
        method = resolve_choices_method(node.choices_method)
        # older backends take neither keyword: pass only what is set
        extra = {k: v for k, v in (("model", node.model), ("lora_path", node.lora_path)) if v is not None}
        decision = self.backend.select(self._prompt(), node.choices, node.temperature, method, **extra)
        self._fill(decision.decision)
        self._set(node.name, decision.decision, decision.meta_info)

    def _role_begin_(self, role: str) -> None:
        if self.cur_role is not None:
            raise ProgramError(f"roles cannot nest: {role!r} began while {self.cur_role!r} is still open")
        self._fill(self.chat_template.role_prefix(role, self.messages_))
        self.cur_role, self._role_begin = role, len(self.text_)

    def _role_end_(self, role: str) -> None:
        if self.cur_role != role:
            raise ProgramError(f"role {role!r} ended but the open role is {self.cur_role!r}")
        content = self.text_[self._role_begin:]
        suffix = self.chat_template.role_suffix(role, self.messages_)
        self.messages_.append({"role": role, "content": content})
        self.cur_role = None
        self._fill(suffix)

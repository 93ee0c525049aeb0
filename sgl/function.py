"""`@sgl.function`: a program, and the ways to run it (`run`, `run_batch`, `trace`, `bind`, `cache`).

    >>> import sgl
    >>> @sgl.function
    ... def qa(s, question):
    ...     s += sgl.user(question)
    ...     s += sgl.assistant(sgl.gen("answer", max_tokens=32))
    >>> state = qa.run(question="What is 2 + 2?", temperature=0)      # doctest: +SKIP
    >>> state["answer"]                                                  # doctest: +SKIP
    '2 + 2 = 4.'
"""

from __future__ import annotations

import functools
import inspect
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Optional, Union

from sgl.backends.base import Backend, resolve_backend
from sgl.interpreter import StreamExecutor
from sgl.sampling import GenParams
from sgl.state import ProgramState
from sgl.tracer import ProgramTrace, trace_function

# `.run(...)` keywords that set program-wide sampling defaults (SGLang's names, plus gen's spellings).
_DEFAULT_ALIASES = {"max_tokens": "max_new_tokens", "min_tokens": "min_new_tokens"}
_DEFAULT_NAMES = set(GenParams.names()) - {"dtype", "regex", "json_schema", "ebnf"}
AUTO_THREADS = 64


class SglFunction:
    """A DSL program. The first parameter of the wrapped function is the state `s`."""

    def __init__(self, func: Callable[..., Any], bind_arguments: Optional[dict[str, Any]] = None) -> None:
        params = list(inspect.signature(func).parameters.values())
        if not params:
            raise TypeError(f"@sgl.function {func.__name__}: the first parameter must be the state (s)")
        self.func = func
        self.name = func.__name__
        self.arg_names = [p.name for p in params[1:]]
        self.bind_arguments = dict(bind_arguments or {})
        self._signature = inspect.signature(func)
        functools.update_wrapper(self, func)

    def bind(self, **kwargs: Any) -> "SglFunction":
        """A copy of this program with some arguments fixed."""
        unknown = sorted(set(kwargs) - set(self.arg_names))
        if unknown:
            raise TypeError(f"{self.name}.bind: unknown argument(s) {', '.join(unknown)}")
        return SglFunction(self.func, {**self.bind_arguments, **kwargs})

    def _split(self, args: tuple, kwargs: dict[str, Any]) -> tuple[dict[str, Any], GenParams]:
        """(program arguments, sampling defaults); a program argument wins a name clash."""
        defaults: dict[str, Any] = {}
        prog: dict[str, Any] = dict(self.bind_arguments)
        for k, v in kwargs.items():
            name = _DEFAULT_ALIASES.get(k, k)
            if k not in self.arg_names and name in _DEFAULT_NAMES:
                defaults[name] = v
            else:
                prog[k] = v
        bound = self._signature.bind(None, *args, **prog)  # raises TypeError naming a missing argument
        bound.apply_defaults()
        prog = dict(list(bound.arguments.items())[1:])
        params = GenParams(**defaults)
        params.to_sampling_params()  # validate now, in the caller
        return prog, params

    def run(self, *args: Any, stream: bool = False, backend: Optional[Backend] = None, **kwargs: Any) -> ProgramState:
        """Run the program once and return its state.

        Keyword arguments are the program's own, or sampling defaults for every gen in it
        (`temperature=0`, `max_new_tokens=64`, ...). With stream=True the program runs in the
        background and `state.text_iter()` yields text as it is generated.
        """
        prog, defaults = self._split(args, kwargs)
        return run_program(self, resolve_backend(backend), prog, defaults, stream)

    def run_batch(self, batch_kwargs: list[Any], *, backend: Optional[Backend] = None,
                  num_threads: Union[str, int] = "auto", progress_bar: bool = False,
                  return_exceptions: bool = False, **sampling_defaults: Any) -> list[Any]:
        """Run the program once per item of `batch_kwargs` (dicts, or tuples of positional args).

        The constant prefix of the program is prefilled once first. Programs run concurrently on
        `num_threads` threads ("auto": up to 64); the runtime batches their requests. The first error
        cancels the programs not yet started and is raised, unless return_exceptions=True (then the
        exception takes that item's place in the returned list).
        """
        be = resolve_backend(backend)
        jobs = []
        for item in batch_kwargs:
            args, kw = (tuple(item), {}) if isinstance(item, (list, tuple)) else ((), dict(item))
            jobs.append(self._split(args, {**kw, **sampling_defaults}))
        if not jobs:
            return []
        if len(jobs) > 1:
            self.cache(be)
        n = min(len(jobs), AUTO_THREADS if num_threads == "auto" else int(num_threads))
        return _run_many(self, be, jobs, max(n, 1), progress_bar, return_exceptions)

    def trace(self, *, backend: Optional[Backend] = None, **kwargs: Any) -> ProgramTrace:
        """The program's IR, without running a model. Arguments not given become placeholders."""
        return trace_function(self.func, self.name, self.arg_names, {**self.bind_arguments, **kwargs})

    def constant_prefix_text(self, backend: Backend) -> str:
        """The text every run of this program starts with (roles rendered by the backend's template)."""
        tr = trace_function(self.func, self.name, self.arg_names, dict(self.bind_arguments), strict=False)
        nodes = tr.constant_prefix
        if not nodes:
            return ""
        ex = StreamExecutor(backend, GenParams(), name=f"{self.name}.prefix", threaded=False)
        for node in nodes:
            ex.submit(node)
        return ex.text_

    def cache(self, backend: Optional[Backend] = None) -> str:
        """Prefill the program's constant prefix into the runtime's cache; returns that prefix."""
        be = resolve_backend(backend)
        if be.is_chat_model:
            return ""
        prefix = self.constant_prefix_text(be)
        if prefix:
            be.prefill([prefix])
        return prefix

    def __call__(self, *args: Any, **kwargs: Any) -> ProgramState:
        return self.run(*args, **kwargs)

    def __repr__(self) -> str:
        return f"SglFunction({self.name})"


def run_program(fn: SglFunction, backend: Backend, arguments: dict[str, Any], defaults: GenParams,
                stream: bool = False) -> ProgramState:
    state = ProgramState(StreamExecutor(backend, defaults, stream, fn.name))
    if stream:
        threading.Thread(target=_body, args=(fn, state, arguments, False), name=f"sgl-{fn.name}-program",
                         daemon=True).start()
        return state
    _body(fn, state, arguments, True)
    return state


def _body(fn: SglFunction, state: ProgramState, arguments: dict[str, Any], raise_errors: bool) -> None:
    ex = state.stream_executor
    try:
        state.ret_value = fn.func(state, **arguments)
    except BaseException as e:
        ex.fail(e)  # skip whatever the program queued before failing
        ex.end()
        if raise_errors:
            raise
        return
    ex.end()
    if raise_errors:
        ex.wait_all()


def _run_many(fn: SglFunction, backend: Backend, jobs: list[tuple[dict[str, Any], GenParams]], threads: int,
              progress_bar: bool, return_exceptions: bool) -> list[Any]:
    bar = None
    if progress_bar:
        from tqdm import tqdm

        bar = tqdm(total=len(jobs), desc=fn.name)
    results: list[Any] = [None] * len(jobs)
    try:
        with ThreadPoolExecutor(threads, thread_name_prefix=f"sgl-{fn.name}") as pool:
            futures = [pool.submit(run_program, fn, backend, prog, defaults) for prog, defaults in jobs]
            if bar is not None:
                for f in futures:
                    f.add_done_callback(lambda _: bar.update())
            for i, f in enumerate(futures):
                try:
                    results[i] = f.result()
                except BaseException as e:
                    if not return_exceptions:
                        for g in futures:
                            g.cancel()
                        raise
                    results[i] = e
    finally:
        if bar is not None:
            bar.close()
    return results

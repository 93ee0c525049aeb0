"""GrammarCompiler: one per (tokenizer, backend). Validates constraints at submission, compiles them in
background threads, and keeps an LRU cache of compiled grammars shared by all requests.

Example:
    >>> compiler = GrammarCompiler(vocab)                    # default backend
    >>> compiler.validate("regex", "[0-9]+")                 # fast; GrammarError -> HTTP 400
    >>> grammar = compiler.compile_async("regex", "[0-9]+").result()
    >>> m = grammar.matcher()                                # per request
"""
from __future__ import annotations

import dataclasses
import functools
import json
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, InvalidStateError, ThreadPoolExecutor
from typing import Any, Optional, Sequence, Union

from sgl.grammars.base import KINDS, BackendOptions, CompiledGrammar, GrammarSpec, get_backend
from sgl.grammars.errors import GrammarError, GrammarTimeout
from sgl.grammars.guards import GuardedGrammar, SchemaGuard
from sgl.grammars.json_schema import normalize, parse_schema
from sgl.grammars.vocabulary import Vocabulary

DEFAULT_BACKEND = "llguidance"
ConstraintValue = Union[str, dict, Sequence[str]]


# Size estimate of one cached compiled grammar (measured with llguidance on 180 JSONSchemaBench
# Github_medium schemas, 49K vocabulary: ~200 KiB each at ~1.1K normalized-schema chars, incl. the
# shared first mask): a fixed part + a part that grows with the normalized source.
GRAMMAR_BASE_BYTES = 64 * 1024
GRAMMAR_BYTES_PER_SOURCE_CHAR = 128
DEFAULT_CACHE_BYTES = 64 * 1024 * 1024


def estimate_grammar_bytes(grammar: CompiledGrammar, vocab_size: int) -> int:
    """Bytes a compiled grammar holds while cached: the backend's own figure when it reports one
    (`memory_size_bytes`), else an estimate from the normalized source length, plus its first mask."""
    own = getattr(grammar, "memory_size_bytes", None)
    spec = getattr(grammar, "spec", None)
    value = getattr(spec, "value", "")
    source = sum(len(v) for v in value) if isinstance(value, tuple) else len(str(value))
    est = own() if callable(own) else own
    if not isinstance(est, int) or est <= 0:
        est = GRAMMAR_BASE_BYTES + GRAMMAR_BYTES_PER_SOURCE_CHAR * source
    return est + 4 * ((vocab_size + 31) // 32)  # + the int32 first mask shared by its matchers


def _key(kind: str, value: ConstraintValue) -> tuple[str, str]:
    if kind == "choices":
        return kind, json.dumps(list(value))
    if isinstance(value, dict):
        return kind, json.dumps(value, sort_keys=True)
    return kind, str(value)


class GrammarCompiler:
    """Compiles regex / json_schema / ebnf / choices constraints for one vocabulary.

    backend: "llguidance" (default), "xgrammar" or "outlines". json_whitespace: "compact" (no blanks
    between JSON tokens) or "flexible" (at most `max_whitespace` blanks in a row). strict_json: reject
    what no grammar enforces exactly (overlapping ``oneOf``, ``uniqueItems: true`` over infinite domains,
    general ``not``, an ``if`` with no complement): with guards=True (default) the grammar relaxes it and
    a semantic guard checks each value as it closes, backtracking on a violation (grammars/guards.py);
    guards=False: strict_json=True rejects such schemas, strict_json=False relaxes them with a warning.
    The cache holds at most `cache_size` grammars and `cache_bytes` estimated bytes
    (`estimate_grammar_bytes`), evicting the least recently used compiled ones first; a grammar larger
    than `cache_bytes` alone is returned but not kept.
    """

    def __init__(self, vocab: Vocabulary, backend: str = DEFAULT_BACKEND, json_whitespace: str = "compact",
                 compile_timeout_s: float = 30.0, cache_size: int = 256, *, max_whitespace: int = 4,
                 strict_json: bool = True, num_threads: int = 2, cache_bytes: int = DEFAULT_CACHE_BYTES,
                 guards: bool = True):
        if json_whitespace not in ("compact", "flexible"):
            raise ValueError(f"json_whitespace must be 'compact' or 'flexible', got {json_whitespace!r}")
        self.vocab = vocab
        self.backend_name = backend
        self.json_whitespace = json_whitespace
        self.max_whitespace = max_whitespace
        self.compile_timeout_s = compile_timeout_s
        self.cache_size = cache_size
        self.cache_bytes = cache_bytes
        self._sizes: dict[tuple[str, str], int] = {}  # estimated bytes of each compiled, cached grammar
        self.strict_json = strict_json
        self.guards = guards and strict_json
        self.backend = get_backend(backend, vocab, BackendOptions(json_whitespace, max_whitespace))
        self._pool = ThreadPoolExecutor(max_workers=num_threads, thread_name_prefix="grammar-compile")
        self._cache: "OrderedDict[tuple[str, str], Future]" = OrderedDict()
        self._specs: "OrderedDict[tuple[str, str], GrammarSpec]" = OrderedDict()  # validated, not yet compiled
        self._lock = threading.Lock()
        self.stats = {"hits": 0, "misses": 0, "timeouts": 0, "errors": 0, "evicted_for_bytes": 0}

    # --- validation (sync, fast) ----------------------------------------------------------------
    def to_spec(self, kind: str, value: ConstraintValue) -> GrammarSpec:
        """Validate and translate to a backend-neutral spec. Raises GrammarError."""
        ws = dict(json_whitespace=self.json_whitespace, max_whitespace=self.max_whitespace)
        if kind not in KINDS:
            raise GrammarError(f"unknown constraint kind {kind!r}; expected one of {KINDS}")
        if kind == "choices":
            if isinstance(value, (str, bytes)) or not value or not all(isinstance(c, str) for c in value):
                raise GrammarError("choices must be a non-empty list of strings")
            return GrammarSpec("choices", tuple(value), **ws)
        if kind == "json_schema":
            norm = normalize(value, strict=self.strict_json, guard=self.guards)  # type: ignore[arg-type]
            if norm.guards:
                source = json.dumps(parse_schema(value))  # type: ignore[arg-type]
                exact = normalize(value, strict=self.strict_json, guard=True,  # type: ignore[arg-type]
                                  exact_bounds=True).to_json() if norm.deferred_bounds else None
                return GrammarSpec("json_schema", norm.to_json(), guards=tuple(norm.guards), source=source,
                                   exact_value=exact, **ws)
            return GrammarSpec("json_schema", norm.to_json(), **ws)
        if not isinstance(value, str) or not value:
            raise GrammarError(f"{kind} must be a non-empty string")
        return GrammarSpec(kind, value, **ws)

    def validate(self, kind: str, value: ConstraintValue) -> None:
        """Raise GrammarError if the constraint is malformed or unsupported. Fast (no vocabulary work)."""
        with self._lock:
            fut = self._cache.get(_key(kind, value))
        if fut is not None and fut.done() and fut.exception() is None:
            return
        spec = self.to_spec(kind, value)
        try:
            self.backend.check(spec)
            with self._lock:  # compile_async reuses the normalized spec
                self._specs[_key(kind, value)] = spec
                while len(self._specs) > self.cache_size:
                    self._specs.popitem(last=False)
        except GrammarError:
            raise
        except Exception as e:  # noqa: BLE001 - a backend's own exception type -> ours
            raise GrammarError(f"invalid {kind}: {e}") from e

    # --- compilation ----------------------------------------------------------------------------
    def compile(self, kind: str, value: ConstraintValue, timeout: Optional[float] = None) -> CompiledGrammar:
        """Blocking convenience wrapper around `compile_async`."""
        return self.compile_async(kind, value).result(timeout)

    def compile_async(self, kind: str, value: ConstraintValue) -> "Future[CompiledGrammar]":
        """A future of the compiled grammar; GrammarError (incl. GrammarTimeout) as its exception."""
        key = _key(kind, value)
        with self._lock:
            fut = self._cache.get(key)
            if fut is not None:
                self._cache.move_to_end(key)
                self.stats["hits"] += 1
                return fut
            self.stats["misses"] += 1
            fut = Future()
            fut.set_running_or_notify_cancel()
            self._cache[key] = fut
            self._trim()
        timer = threading.Timer(self.compile_timeout_s, self._time_out, args=(key, fut))
        timer.daemon = True
        timer.start()
        self._pool.submit(self._run, key, kind, value, fut, timer)
        return fut

    def _run(self, key: tuple[str, str], kind: str, value: ConstraintValue, fut: Future,
             timer: threading.Timer) -> None:
        t0 = time.perf_counter()
        try:
            with self._lock:
                spec = self._specs.pop(key, None)
            grammar = self.compile_spec(spec if spec is not None else self.to_spec(kind, value))
            grammar.compile_time_s = time.perf_counter() - t0  # type: ignore[attr-defined]
        except Exception as e:  # noqa: BLE001
            timer.cancel()
            err = e if isinstance(e, GrammarError) else GrammarError(f"failed to compile {kind}: {e}")
            self.stats["errors"] += 1
            self._forget(key, fut)
            _settle(fut, exc=err)
            return
        timer.cancel()
        size = estimate_grammar_bytes(grammar, self.vocab.vocab_size)
        if not _settle(fut, result=grammar):  # timed out meanwhile: still cache the late result
            fut = Future()
            fut.set_result(grammar)
            with self._lock:
                self._cache[key] = fut
        with self._lock:
            if self._cache.get(key) is fut:  # NOTE: not if cleared or evicted while compiling
                self._sizes[key] = size
                self._trim(keep=key)

    def _trim(self, keep: Optional[tuple[str, str]] = None) -> None:
        """Evict least recently used entries over `cache_size` entries or `cache_bytes` (lock held).
        Pending compilations count 0 bytes until done. `keep` (just compiled) goes last, and only when
        it alone is over the byte bound."""
        while len(self._cache) > self.cache_size:
            self._sizes.pop(self._cache.popitem(last=False)[0], None)
        total = sum(self._sizes.values())
        for k in [k for k in self._cache if k in self._sizes and k != keep]:
            if total <= self.cache_bytes:
                break
            del self._cache[k]
            total -= self._sizes.pop(k)
            self.stats["evicted_for_bytes"] += 1
        if keep is not None and total > self.cache_bytes and keep in self._sizes:
            del self._cache[keep]
            self._sizes.pop(keep)
            self.stats["evicted_for_bytes"] += 1

    def compile_spec(self, spec: GrammarSpec) -> CompiledGrammar:
        """Compile a validated spec now (no cache); wraps it with its semantic guards, if any."""
        grammar = self.backend.compile(spec)
        if spec.guards:
            exact = None
            if spec.exact_value is not None:
                exact_spec = dataclasses.replace(spec, value=spec.exact_value, guards=(), exact_value=None)
                exact = functools.partial(self.backend.compile, exact_spec)  # compiled when first needed
            grammar = GuardedGrammar(grammar, SchemaGuard(json.loads(spec.source or "true"), list(spec.guards)),
                                     exact)
        grammar.warm()  # NOTE: off the mask path: the first mask is the slowest
        return grammar

    def _time_out(self, key: tuple[str, str], fut: Future) -> None:
        if _settle(fut, exc=GrammarTimeout(f"grammar compilation took longer than {self.compile_timeout_s:g} s")):
            self.stats["timeouts"] += 1
            self._forget(key, fut)

    def _forget(self, key: tuple[str, str], fut: Future) -> None:
        with self._lock:
            if self._cache.get(key) is fut:
                del self._cache[key]
                self._sizes.pop(key, None)

    def cache_len(self) -> int:
        return len(self._cache)

    def cache_nbytes(self) -> int:
        """Estimated bytes of the compiled grammars cached now (<= cache_bytes)."""
        with self._lock:
            return sum(self._sizes.values())

    def clear_cache(self) -> None:
        with self._lock:
            self._cache.clear()
            self._sizes.clear()

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _settle(fut: Future, result: Any = None, exc: Optional[BaseException] = None) -> bool:
    """Complete `fut` once; False if it was already completed (the other party won the race)."""
    try:
        if exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(result)
        return True
    except InvalidStateError:
        return False

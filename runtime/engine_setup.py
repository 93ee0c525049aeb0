"""How the engine sizes and assembles its parts: the KV pool's default size, the host tier for swap
preemption and the hierarchical prefix cache, and the grammar compiler (built on first use: LazyGrammar).

    pool_size = args.max_total_tokens or default_pool_size(config, args, kv_dtype)  # kv_dtype: engine_kv_dtype
    mover, host_slots = host_kv_tier(runner.kv, args)       # (None, 0) in recompute mode or at 0 GB
    cache_mover = hierarchical_cache_mover(runner.kv, args)   # None unless --hierarchical-cache
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from typing import Any, Callable, Optional

from sgl.runtime.config import ServerArgs

logger = logging.getLogger("sgl.engine")


def hierarchical_cache_mover(kv: Any, args: ServerArgs) -> Optional[Any]:
    """The host tier of the hierarchical prefix cache (`--hierarchical-cache`, `--host-cache-tokens`)."""
    if not args.hierarchical_cache:
        return None
    from sgl.runtime.executor.kv_mover import HostKVMover

    return HostKVMover(kv, args.host_cache_tokens, args.swap_dir)


def host_kv_tier(kv: Any, args: ServerArgs) -> tuple[Any, int]:
    """The host tier for swap preemption (`--swap-space` GB; none in recompute mode or at 0 GB)."""
    from sgl.runtime.executor.kv_mover import HostKVMover

    per_slot = 2 * kv.num_layers * kv.num_kv_heads * kv.head_dim * kv.k.element_size()
    slots = int(args.swap_space * 1e9) // per_slot if args.preemption_mode == "swap" else 0
    if slots < 1:
        return None, 0
    return HostKVMover(kv, slots, args.swap_dir), slots


def engine_kv_dtype(args: ServerArgs, model_dtype: Any, native: bool) -> Any:
    """The KV pool's torch dtype for `--kv-cache-dtype` (resolve_kv_dtype; `native`: the weights run in the CPU
    kernels). Tensor-parallel ranks build their pools in the model dtype, so a different one is rejected there."""
    from sgl.runtime.executor.kv_cache import resolve_kv_dtype

    kv_dtype = resolve_kv_dtype(args.kv_cache_dtype, model_dtype, native)
    if args.tp_size > 1 and kv_dtype != model_dtype:
        raise ValueError(f"kv_cache_dtype {args.kv_cache_dtype} with tp_size > 1: tensor-parallel ranks keep the KV "
                         f"cache in the model dtype ({str(model_dtype).removeprefix('torch.')}); use auto")
    return kv_dtype


def default_pool_size(config: Any, args: ServerArgs, kv_dtype: Any) -> int:
    """Slots of the KV pool (`kv_dtype`: a torch dtype) that fit mem_fraction_static of the available memory."""
    from sgl.runtime.executor.kv_cache import KVCache

    per_slot = KVCache.bytes_per_slot(config, kv_dtype)
    avail = 8 << 30
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
    except OSError:
        pass
    # NOTE: capped: a CPU serves a handful of long sequences, not a GPU's worth.
    return max(2048, min(int(avail * args.mem_fraction_static / per_slot), 131072))


def make_grammar_compiler(args: ServerArgs, tokenizer: Any, vocab_size: int) -> Any:
    if args.grammar_backend == "none":
        return None
    try:
        from sgl.grammars import GrammarCompiler, Vocabulary
    except ImportError:
        logger.warning("sgl.grammars is not available: constrained decoding is disabled")
        return None
    vocab = _vocabulary(Vocabulary, tokenizer, vocab_size)
    return GrammarCompiler(vocab, backend=args.grammar_backend, json_whitespace=args.json_whitespace,
                           compile_timeout_s=args.grammar_compile_timeout, guards=not args.json_strict,
                           cache_bytes=args.grammar_cache_max_bytes)


class LazyGrammar:
    """The engine's grammar compiler, built by `build` on the first `get()` (the first constrained request).

    NOTE: why lazily: its tokenizer tables (the grammar Vocabulary and the backend's token trie: ~37 MB
    resident on the default model, benchmarks/bench_memory.py) are memory a server that never sees a
    constrained request does not need; building them costs the first constrained request once (2.1 s at
    load 9; async requests await it on a worker thread, Engine.stream_request).
    `get()` may run on any thread (request validation runs on the caller's); the lock makes one build.
    """

    _UNBUILT = object()

    def __init__(self, build: Callable[[], Any]) -> None:
        self._build = build
        self._value: Any = self._UNBUILT
        self._lock = threading.Lock()

    def get(self) -> Any:
        """The compiler (built now if it is not yet), or None when grammars are off or unavailable."""
        if self._value is self._UNBUILT:
            with self._lock:
                if self._value is self._UNBUILT:
                    self._value = self._build()
        return self._value

    def peek(self) -> Any:
        """The compiler if it was built, else None (never builds it: shutdown, tests)."""
        return None if self._value is self._UNBUILT else self._value

    def set(self, value: Any) -> None:
        """Replace the compiler (benchmarks swap in other backends)."""
        self._value = value



# (id of a tokenizer backend, EOS ids, logits width) -> (that backend, its grammar Vocabulary). NOTE: GGUF
# tokenizers are shared per vocabulary within the process (tokenizer_gguf.cached_gguf_backend), so an engine
# reloaded after an LRU unload finds its Vocabulary here (Gemma 3's 262K tokens: seconds to build). The
# backend is held so its id cannot be reused by another while cached; at most _MAX_VOCABS are kept.
_VOCABS: "OrderedDict[tuple[int, frozenset[int], int], tuple[Any, Any]]" = OrderedDict()
_MAX_VOCABS = 4


def _vocabulary(vocabulary_cls: Any, tokenizer: Any, vocab_size: int) -> Any:
    """The grammar Vocabulary of `tokenizer`, built once per tokenizer backend (a frozen, shareable value)."""
    key = (id(tokenizer.backend), frozenset(tokenizer.eos_token_ids), vocab_size)
    hit = _VOCABS.get(key)
    if hit is not None and hit[0] is tokenizer.backend:
        _VOCABS.move_to_end(key)
        return hit[1]
    vocab = vocabulary_cls.from_tokenizer(tokenizer.backend, tokenizer.eos_token_ids, vocab_size)
    _VOCABS[key] = (tokenizer.backend, vocab)
    while len(_VOCABS) > _MAX_VOCABS:
        _VOCABS.popitem(last=False)
    return vocab

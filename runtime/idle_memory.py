"""Memory the engine gives back to the OS when it goes idle (after its load, and when the last request ends).

    release_idle_memory(allocator, kv)   # on the scheduler thread: its prefill scratch, the KV pages of freed
                                         # slots, then every malloc arena's free pages

What is given back, measured on the default model (benchmarks/bench_memory.py, native weights):
  * the native kernels' prefill scratch (sgl.kernels.cpu.quant._scratch): one fp32 copy of the largest
    layer weight, 7 MB, per thread that ran a prefill; it stays allocated between prefills;
  * the KV pool's pages of slots freed since the last idle (evicted or flushed prefixes, preempted requests,
    rejected drafts): a freed slot's page stayed resident before, the pool's resident set a high-water mark;
    the radix cache's slots (cached prefixes, for reuse) stay, as SGLang and vLLM keep theirs;
  * MKL's cached GEMM buffers (mkl_free_buffers, exported by torch's libtorch_cpu as mkl_serv_free_buffers):
    a prefill's fp32 matmuls (fp32 weights, and the native kernels' dequantized layer tiles) leave 5.4 MB of
    packing buffers that MKL keeps for its next call; the next prefill allocates them again (no measurable
    cost: 300-token prefills alternated with and without the free, 2.0 s CPU either way);
  * free pages inside glibc's heaps (malloc_trim): the tokenizer's JSON parse leaves ~15 MB of freed
    chunks in the main heap at load, and a prompt's small temporaries leave more in the scheduler
    thread's arena. glibc returns the top of a heap by itself but keeps free chunks below live ones.
Cheap (malloc_trim walks the free lists: ~1 ms) and idempotent; the next request faults the pages back in
(a 7 MB scratch: ~1 ms against a prefill's hundreds). Linux + glibc only for the trim; the scratch is dropped
everywhere. The peak (VmHWM) is not changed by this: only what stays resident between requests.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import mmap
import os
import sys
from typing import Any, Optional


def release_idle_memory(allocator: Optional[Any] = None, kv: Optional[Any] = None) -> int:
    """Drop the calling thread's prefill scratch, the KV pages of slots freed since the last call (with the
    scheduler's `allocator` and the runner's `kv`), and trim every malloc arena; returns the bytes dropped."""
    from sgl.kernels.cpu.quant import release_scratch

    freed = release_scratch()
    if allocator is not None and kv is not None:
        freed += release_free_kv(allocator, kv)
    free_mkl_buffers()
    trim_heaps()
    return freed


def release_free_kv(allocator: Any, kv: Any) -> int:
    """The KV pool's pages that only free slots use, freed since the last call (a `SlotAllocator` and its
    `KVCache`): evicted or flushed prefixes, preempted requests, rejected drafts. Bytes dropped."""
    return kv.drop_slots(allocator.take_freed_runs(min_len=max(1, mmap.PAGESIZE // kv.slot_bytes)))


def free_mkl_buffers() -> bool:
    """MKL's mkl_free_buffers: the GEMM buffers it caches between calls (buffers in use by a running call, e.g.
    another engine's prefill on its own thread, are not unused and stay). True if torch links MKL and it ran."""
    import torch

    try:
        _library(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so")).mkl_serv_free_buffers()
        return True
    except (OSError, AttributeError):  # torch without MKL (ARM builds), or another platform's library name
        return False


@functools.lru_cache(maxsize=None)
def _library(path: Optional[str]) -> ctypes.CDLL:
    """A shared library opened once (None: the C library). find_library runs `ldconfig -p` in a subprocess:
    too dear to repeat every time the engine goes idle."""
    return ctypes.CDLL(path if path is not None else ctypes.util.find_library("c") or "libc.so.6")


def trim_heaps() -> bool:
    """malloc_trim(0): give the free pages of every glibc arena back to the OS; True if it ran."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        _library(None).malloc_trim(ctypes.c_size_t(0))
        return True
    except (OSError, AttributeError):  # musl and others: no malloc_trim
        return False

"""glibc malloc's policy for large blocks, so the temporaries of a long prefill go back to the OS.

By default glibc serves blocks >= 128 KiB with mmap, but raises that threshold to the size of each such block
freed (up to 32 MiB): after one prefill every later activation of up to 32 MiB (a 700-token prompt's
attention scores are 18 MB) comes from the heap, and the heap keeps what it once held. Measured on the
default model in native format: after a ~512-token prompt the resident set stayed ~18 MB higher than with a
fixed threshold (benchmarks/bench_memory.py). A fixed 1 MiB threshold keeps the decode step's own tensors
(at batch 32 the largest, gate_up's output, is 32 x 3072 x 4 B = 384 KiB) on the heap, where they are reused
without page faults, and maps/unmaps the prefill's larger ones. Linux + glibc only; elsewhere a no-op.
The Engine sets it when it starts (process-wide, as torch's thread count).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_MMAP_THRESHOLD = -3  # glibc malloc.h
MMAP_THRESHOLD_BYTES = 1 << 20


def set_mmap_threshold(nbytes: int = MMAP_THRESHOLD_BYTES) -> bool:
    """mallopt(M_MMAP_THRESHOLD, nbytes) (fixing it also turns off glibc's dynamic raise); True if applied."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(ctypes.c_int(M_MMAP_THRESHOLD), ctypes.c_int(nbytes)))
    except (OSError, AttributeError):  # musl and others: no mallopt
        return False

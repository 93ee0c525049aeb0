"""A fixed malloc mmap threshold gives a freed large temporary back to the OS (glibc's dynamic one keeps it)."""

from __future__ import annotations

import sys

import pytest

from . import malloc_probe

# In a fresh interpreter: malloc + touch + free a 20 MB block twice (as two prefills' temporaries), then print
# how much of the resident set that left behind, in MB.
SCRIPT = """
import ctypes, sys
from sgl.runtime.malloc_policy import set_mmap_threshold
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
if sys.argv[1] == "fixed":
    assert set_mmap_threshold()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
before = rss()
for _ in range(2):
    p = libc.malloc(20 << 20)
    ctypes.memset(p, 1, 20 << 20)
    libc.free(ctypes.c_void_p(p))
print(rss() - before)
"""


def retained_mb(mode: str) -> float:
    return malloc_probe.retained_mb(SCRIPT, mode)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_fixed_threshold_returns_large_temporaries() -> None:
    default = retained_mb("default")
    if default < 15:
        pytest.skip(f"this libc does not keep the freed block ({default:.1f} MB retained): nothing to show")
    assert retained_mb("fixed") < 2, "the fixed threshold should unmap the freed 20 MB block"

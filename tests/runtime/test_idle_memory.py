"""What the engine gives back when idle (runtime/idle_memory.py) and the grammar compiler built on first use
(runtime/engine_setup.py LazyGrammar): each cut of the server's resident set, with a test that fails without it."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from sgl.runtime.engine_setup import LazyGrammar

from . import malloc_probe

ROOT = Path(__file__).resolve().parents[2]

# In a fresh interpreter: 40 MB of small blocks (served from the heap, below the mmap threshold), one block
# allocated after them kept alive (so the heap's top cannot shrink by itself), the rest freed; prints the
# resident set left behind in MB, after trim_heaps() when argv[1] == "trim".
SCRIPT = """
import ctypes, sys
from sgl.runtime.idle_memory import trim_heaps
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
before = rss()
blocks = [libc.malloc(4000) for _ in range(10000)]
for p in blocks:
    ctypes.memset(p, 1, 4000)
pin = libc.malloc(4000)
for p in blocks:
    libc.free(ctypes.c_void_p(p))
if sys.argv[1] == "trim":
    assert trim_heaps()
print(rss() - before)
"""


def retained_mb(mode: str) -> float:
    return malloc_probe.retained_mb(SCRIPT, mode)


# In a fresh interpreter: one prefill-sized fp32 matmul (MKL caches its packing buffers after it); prints the
# resident set that stays, after free_mkl_buffers() when argv[1] == "free"; "nan" when torch has no MKL. A first
# matmul, its buffers freed, runs before the measured one: measured from the start, the one-time set-up of the first
# call (not MKL's buffers) stayed too, and "free" read 0-1.8 MB of 4.3 (one run in four failed a 2.5 MB margin);
# now "keep" reads 2.6 MB and "free" 0.0-0.01 (8 runs each).
MKL_SCRIPT = """
import sys
import torch
from sgl.runtime.idle_memory import free_mkl_buffers, trim_heaps
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
torch.set_num_threads(1)
x, w = torch.randn(512, 576), torch.randn(3072, 576)
torch.mm(x, w.T)
if not free_mkl_buffers():
    print("nan")
    sys.exit()
trim_heaps()
before = rss()
y = torch.mm(x, w.T)
del y
if sys.argv[1] == "free":
    free_mkl_buffers()
trim_heaps()
print(rss() - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/statm")
def test_free_mkl_buffers_returns_the_gemm_buffers_a_prefill_leaves() -> None:
    kept = malloc_probe.retained_mb(MKL_SCRIPT, "keep")
    freed = malloc_probe.retained_mb(MKL_SCRIPT, "free")
    if freed != freed:  # nan
        pytest.skip("this torch does not link MKL")
    assert kept > 2, f"an fp32 GEMM should leave MKL's buffers resident ({kept:.1f} MB)"
    assert kept - freed > 2, f"free_mkl_buffers kept {freed:.1f} of {kept:.1f} MB (MKL caches ~2.6 MB here)"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc_trim")
def test_trim_gives_back_free_pages_below_a_live_block() -> None:
    kept = retained_mb("keep")
    if kept < 30:
        pytest.skip(f"this libc gives the freed blocks back by itself ({kept:.1f} MB retained): nothing to show")
    assert retained_mb("trim") < 5, "trim_heaps should return the 40 MB of freed chunks below the live block"


def test_lazy_grammar_builds_once_on_first_use() -> None:
    built: list[object] = []

    def build() -> object:
        built.append(object())
        return built[-1]

    lazy = LazyGrammar(build)
    assert lazy.peek() is None and not built  # nothing at start
    got: list[object] = []
    threads = [threading.Thread(target=lambda: got.append(lazy.get())) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(built) == 1 and all(g is built[0] for g in got) and lazy.peek() is built[0]
    off = LazyGrammar(lambda: None)  # grammar_backend "none": None, built (asked) once
    assert off.get() is None and off.peek() is None


def test_engine_builds_grammars_on_first_constrained_request_and_drops_scratch_when_idle(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from sgl.kernels.cpu import quant
    from sgl.runtime.engine import Engine

    released: list[int] = []
    release = quant.release_scratch
    monkeypatch.setattr(quant, "release_scratch", lambda: released.append(release()) or released[-1])
    eng = Engine(model_path="default", num_threads=1, max_total_tokens=4096, show_progress=False)
    try:
        assert eng._grammar.peek() is None, "the grammar compiler must not be built before a constrained request"
        eng.generate("alpha bravo charlie delta echo " * 100, {"max_new_tokens": 2, "temperature": 0})
        eng.check_integrity()  # (a command: it runs after the step that went idle, and its release)
        assert eng._grammar.peek() is None
        if eng.weight_format == "native" and quant.extension_available():
            # the 701-token prefill dequantized layer weights into the scheduler thread's scratch (gate_up in
            # fp32: 1536 x 2 x 576 x 4 B = 7 MB); going idle gave it back
            assert max(released, default=0) >= 2 * 1536 * 576 * 4, released
        person = json.loads((ROOT / "examples/data/person_extraction.json").read_text())
        build = eng._grammar._build
        eng._grammar._build = lambda: time.sleep(3.0) or build()  # a slow first build (a big vocabulary)

        async def serve() -> tuple[dict, float]:
            # the server's path: the first constrained request's build must not stall the event loop
            gaps, done = [0.0], asyncio.Event()

            async def tick() -> None:
                last = time.monotonic()
                while not done.is_set():
                    await asyncio.sleep(0.02)
                    gaps.append(time.monotonic() - last)
                    last = time.monotonic()

            ticker = asyncio.create_task(tick())
            out = await eng.async_generate(person["prompt"], {"max_new_tokens": 96, "temperature": 0,
                                                              "json_schema": json.dumps(person["schema"])})
            done.set()
            await ticker
            return out, max(gaps)

        out, stall = asyncio.run(serve())
        assert eng._grammar.peek() is not None
        assert stall < 1.5, f"the event loop stalled {stall:.2f} s while the grammar compiler was built"
        assert set(json.loads(out["text"])) <= set(person["schema"]["properties"])
        eng.check_integrity()
        kv = eng.scheduler.runner.kv
        cached = kv.resident_bytes()  # the radix cache's prefixes (~800 tokens x 23 KB, an fp16 pool): kept
        assert cached > 10 << 20, cached
        assert eng.flush_cache()  # their slots are free now: their pages go back (they stayed resident before)
        assert kv.resident_bytes() < cached / 10, (kv.resident_bytes(), cached)
        eng.check_integrity()
    finally:
        eng.shutdown()


# In a fresh interpreter (a clean VmHWM): load the default model in native format; prints the peak above the
# resident set after the load, in MB.
LOAD_SCRIPT = """
from pathlib import Path
from sgl.runtime.malloc_policy import set_mmap_threshold
set_mmap_threshold()  # as the Engine does
from sgl.runtime.models.loader import load_model
def status(key):
    return next(int(l.split()[1]) / 1024 for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(key))
loaded = load_model("default", weight_format="native", show_progress=False)
print(loaded.weight_format, status("VmHWM:") - status("VmRSS:"))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM, madvise")
def test_native_load_peak_is_not_weights_plus_file() -> None:
    out = subprocess.run([sys.executable, "-c", LOAD_SCRIPT], capture_output=True, text=True, check=True)
    fmt, over = out.stdout.split()
    if fmt != "native":
        pytest.skip("the native format is unavailable here (no CPU extension)")
    # Before: the GGUF's pages (93 MB) stayed mapped and every weight's loader copy lived until the arena was
    # full: the peak was 136 MB above the loaded state; then ~60 (each weight copied out of the file, then into
    # the arena built at the end); now ~6: the arena is laid out from the header first and each weight's blocks
    # go from the file straight into it (native_weights.ArenaPlan)
    assert float(over) < 30, f"native load peaked {float(over):.0f} MB above its loaded resident set"


def test_dropping_a_gguf_files_pages_loses_nothing() -> None:
    from sgl.runtime.models.default_model import default_model_path
    from sgl.runtime.models.gguf_file import GGUFFile

    f = GGUFFile(default_model_path())
    t = f.tensors[-1]
    before = t.data.tobytes()
    f.drop_pages()
    assert t.data.tobytes() == before  # refaulted from the page cache

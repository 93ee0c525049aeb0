"""Moving a prompt's KV from a prefill server to a decode server (prefill/decode disaggregation).

    transfer = SharedMemoryTransfer(timeout_s=30)
    handle = transfer.put_with(shape, dtype, fill)   # prefill side: fill(buf) writes the KV into buf
    with transfer.opened(handle) as kv: ...          # decode side (any process on this machine)

One interface (`KVTransfer`), one backend in the serving path: POSIX shared-memory segments
(/dev/shm) that the prefill side keeps and REUSES. Fresh memory costs a page fault per 4 KiB page on
first touch (tmpfs gets no huge pages here), which made a new segment per transfer ~7x slower than
a warm copy (README, benchmarks/bench_pd.py); a warm segment is two memcpys, pool -> segment -> pool.

A segment = a 64-byte header, then the data. Header (int64): [0] generation, [1] state (FREE 0,
FULL 1, WRITING 2), [2] deadline (wall-clock ns; both sides run on one machine).
  * writer: picks a FREE segment large enough (or makes one), sets WRITING, fills it, bumps the
    generation, sets FULL with a deadline = now + timeout; the handle names (segment, generation).
  * reader: maps the segment once (cached), checks the generation, state FULL and that the deadline
    is at least `READ_MARGIN_S` away, copies, then sets FREE.
  * an undelivered KV: the writer's reaper sets FULL segments FREE `read_margin_s` after their
    deadline (a reader never starts that late, and a copy takes far less than the margin), and
    unlinks segments idle for `IDLE_UNLINK_S`; `close()` unlinks all of them.
A handle whose generation moved on (taken, expired) is a KVTransferError naming it.
torch.distributed point-to-point (gloo send/recv) is measured beside it in benchmarks/bench_pd.py; it
needs a process group between every prefill/decode pair, which independent servers do not have.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass
from multiprocessing import resource_tracker, shared_memory
from typing import Any, Callable, Iterator

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
HEADER = 64  # bytes before the data (keeps the data 64-byte aligned)
FREE, FULL, WRITING = 0, 1, 2
READ_MARGIN_S = 2.0
IDLE_UNLINK_S = 120.0


class KVTransferError(RuntimeError):
    """The KV is not there (expired, already taken, never written) or has the wrong shape."""


class KVTransfer(ABC):
    @abstractmethod
    def put_with(self, shape: tuple[int, ...], dtype: torch.dtype, fill: Callable[[torch.Tensor], None]) -> dict[str, Any]:
        """Get a transfer buffer of `shape`, let `fill` write the KV into it; returns the handle."""

    @abstractmethod
    def opened(self, handle: dict[str, Any]) -> "contextlib.AbstractContextManager[torch.Tensor]":
        """The KV behind `handle` as a tensor, valid inside the `with` block; released after it."""

    def put(self, kv: torch.Tensor) -> dict[str, Any]:
        return self.put_with(tuple(kv.shape), kv.dtype, lambda buf: buf.copy_(kv))

    def take(self, handle: dict[str, Any]) -> torch.Tensor:
        with self.opened(handle) as kv:
            return kv.clone()

    def close(self) -> None:  # noqa: B027 - optional
        pass


def _numel(shape: Any) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


@dataclass
class _Segment:
    shm: shared_memory.SharedMemory
    header: torch.Tensor  # int64 [3] view of the header
    idle_since: float


def _map(shm: shared_memory.SharedMemory) -> torch.Tensor:
    return torch.frombuffer(shm.buf, dtype=torch.int64, count=3)


class SharedMemoryTransfer(KVTransfer):
    def __init__(self, timeout_s: float = 30.0, read_margin_s: float = READ_MARGIN_S) -> None:
        self.timeout_s, self.read_margin_s = timeout_s, read_margin_s
        self._own: dict[str, _Segment] = {}  # writer side: segments this process made
        self._mapped: dict[str, shared_memory.SharedMemory] = {}  # reader side: segments opened by name
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._reaper = threading.Thread(target=self._reap_loop, name="sgl-kv-reaper", daemon=True)
        self._reaper.start()

    # ---- writer --------------------------------------------------------------------------------
    def put_with(self, shape: tuple[int, ...], dtype: torch.dtype, fill: Callable[[torch.Tensor], None]) -> dict[str, Any]:
        dtype_name = str(dtype).removeprefix("torch.")
        if dtype_name not in DTYPES:
            raise KVTransferError(f"KV dtype {dtype_name} cannot be transferred")
        numel = _numel(shape)
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        seg = self._acquire(nbytes)
        try:
            view = torch.frombuffer(seg.shm.buf, dtype=dtype, count=numel, offset=HEADER).view(shape)
            fill(view)
            del view
        except BaseException:
            seg.header[1] = FREE
            raise
        gen = int(seg.header[0]) + 1
        seg.header[0] = gen
        seg.header[2] = time.time_ns() + int(self.timeout_s * 1e9)
        seg.header[1] = FULL  # NOTE: last: a reader that sees FULL sees the data and the generation
        return {"backend": "shm", "name": seg.shm.name, "generation": gen, "shape": list(shape), "dtype": dtype_name}

    def _acquire(self, nbytes: int) -> _Segment:
        with self._lock:
            fits = [s for s in self._own.values() if int(s.header[1]) == FREE and s.shm.size - HEADER >= nbytes]
            if fits:
                seg = min(fits, key=lambda s: s.shm.size)  # the smallest that fits
            else:
                name = f"sgl-kv-{uuid.uuid4().hex[:16]}"
                # (registered with this process's resource tracker: if the server dies, the tracker unlinks it)
                shm = shared_memory.SharedMemory(name=name, create=True, size=HEADER + max(nbytes, 1))
                seg = _Segment(shm, _map(shm), time.monotonic())
                seg.header[0] = 0
                self._own[name] = seg
            seg.header[1] = WRITING
            return seg

    def pending(self) -> int:
        """Segments holding a KV nobody has taken yet."""
        with self._lock:
            return sum(int(s.header[1]) == FULL for s in self._own.values())

    def reap(self) -> int:
        """FULL segments past deadline + READ_MARGIN_S become FREE (returns how many); long-idle ones are unlinked."""
        now_ns, now, freed = time.time_ns(), time.monotonic(), 0
        with self._lock:
            for name, s in list(self._own.items()):
                state = int(s.header[1])
                if state == FULL and now_ns > int(s.header[2]) + int(self.read_margin_s * 1e9):
                    s.header[0] = int(s.header[0]) + 1  # the handle is void from here on
                    s.header[1] = FREE
                    freed += 1
                    state = FREE
                if state != FREE:
                    s.idle_since = now
                elif now - s.idle_since > IDLE_UNLINK_S:
                    self._unlink(self._own.pop(name))
            for name in [n for n in self._mapped if not os.path.exists(f"/dev/shm/{n}")]:
                with contextlib.suppress(BufferError):  # the writer unlinked it: let the memory go
                    self._mapped.pop(name).close()
        return freed

    @staticmethod
    def _unlink(s: _Segment) -> None:
        del s.header
        s.shm.close()
        try:
            s.shm.unlink()
        except FileNotFoundError:
            pass

    def _reap_loop(self) -> None:
        while not self._stop.wait(0.25):
            self.reap()

    # ---- reader --------------------------------------------------------------------------------
    @contextlib.contextmanager
    def opened(self, handle: dict[str, Any]) -> Iterator[torch.Tensor]:
        try:
            name, gen = str(handle["name"]), int(handle["generation"])
            shape, dtype = [int(x) for x in handle["shape"]], DTYPES[handle["dtype"]]
        except (KeyError, TypeError, ValueError) as e:
            raise KVTransferError(f"kv: a handle needs name, generation, shape and dtype ({e})") from None
        if not name.startswith("sgl-kv-"):
            raise KVTransferError(f"kv.name {name!r} is not a KV segment")
        shm = self._open(name)
        header = _map(shm)
        if int(header[0]) != gen or int(header[1]) != FULL or time.time_ns() > int(header[2]):
            raise KVTransferError(f"KV {name} generation {gen} is gone (taken, or expired after the transfer timeout)")
        numel = _numel(shape)
        if HEADER + numel * torch.empty((), dtype=dtype).element_size() > shm.size:
            raise KVTransferError(f"KV segment {name} is smaller than its shape {shape}")
        view = torch.frombuffer(shm.buf, dtype=dtype, count=numel, offset=HEADER).view(shape)
        try:
            yield view
        finally:
            del view
            if int(header[0]) == gen:
                header[1] = FREE  # the writer may reuse it now

    def _open(self, name: str) -> shared_memory.SharedMemory:
        with self._lock:
            if name in self._own:
                return self._own[name].shm
            shm = self._mapped.get(name)
            if shm is None:
                try:
                    shm = shared_memory.SharedMemory(name=name)
                except FileNotFoundError:
                    raise KVTransferError(f"KV segment {name} does not exist (its prefill server stopped?)") from None
                # NOTE: Python 3.11 registers a segment it merely opens; the reader must not unlink the
                # writer's segments when it exits
                resource_tracker.unregister(shm._name, "shared_memory")  # type: ignore[attr-defined]
                self._mapped[name] = shm
            return shm

    def close(self) -> None:
        self._stop.set()
        with self._lock:
            for s in self._own.values():
                self._unlink(s)
            self._own.clear()
            for shm in self._mapped.values():
                try:
                    shm.close()
                except BufferError:  # a view still alive somewhere: the mapping goes with the process
                    pass
            self._mapped.clear()

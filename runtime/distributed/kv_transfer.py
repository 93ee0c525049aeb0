"""Moving a prompt's KV from a prefill server to a decode server (prefill/decode disaggregation).

    transfer = SharedMemoryTransfer(timeout_s=30)
    handle = transfer.put(kv)        # prefill side: kv [2, layers, L, Hkv, D]; handle: JSON-able dict
    kv = transfer.take(handle)       # decode side (any process on the machine): the tensor, segment freed

One interface (`KVTransfer`), one backend in the serving path: a POSIX shared-memory segment per
request (/dev/shm), written once by the prefill server and read once by the decode server, which
unlinks it. A segment nobody takes within `timeout_s` (the decode server died, the router gave up)
is unlinked by the prefill side's reaper, so a failed transfer leaks nothing on either side.
benchmarks/bench_pd.py measures it against torch.distributed point-to-point (gloo send/recv), which
needs a process group between every prefill/decode pair and copies through a TCP socket: shared
memory won on one machine (see README), so p2p is measured but not wired in.
"""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from abc import ABC, abstractmethod
from typing import Callable, Iterator
from multiprocessing import resource_tracker, shared_memory
from typing import Any

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class KVTransferError(RuntimeError):
    """The KV is not there (expired, already taken, never written) or has the wrong shape."""


class KVTransfer(ABC):
    @abstractmethod
    def put_with(self, shape: tuple[int, ...], dtype: torch.dtype, fill: Callable[[torch.Tensor], None]) -> dict[str, Any]:
        """Allocate a transfer buffer of `shape`, let `fill` write the KV into it; returns the handle."""

    @abstractmethod
    def opened(self, handle: dict[str, Any]) -> "contextlib.AbstractContextManager[torch.Tensor]":
        """The KV behind `handle` as a tensor, valid inside the `with` block; freed after it."""

    def put(self, kv: torch.Tensor) -> dict[str, Any]:
        return self.put_with(tuple(kv.shape), kv.dtype, lambda buf: buf.copy_(kv))

    def take(self, handle: dict[str, Any]) -> torch.Tensor:
        with self.opened(handle) as kv:
            return kv.clone()

    def close(self) -> None:  # noqa: B027 - optional
        pass


class SharedMemoryTransfer(KVTransfer):
    def __init__(self, timeout_s: float = 30.0) -> None:
        self.timeout_s = timeout_s
        self._pending: dict[str, float] = {}  # segment name -> deadline (put, not yet reaped)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._reaper = threading.Thread(target=self._reap_loop, name="sgl-kv-reaper", daemon=True)
        self._reaper.start()

    def put_with(self, shape: tuple[int, ...], dtype: torch.dtype, fill: Callable[[torch.Tensor], None]) -> dict[str, Any]:
        dtype_name = str(dtype).removeprefix("torch.")
        if dtype_name not in DTYPES:
            raise KVTransferError(f"KV dtype {dtype_name} cannot be transferred")
        numel = 1
        for n in shape:
            numel *= n
        name = f"sgl-kv-{uuid.uuid4().hex[:16]}"
        shm = shared_memory.SharedMemory(name=name, create=True, size=max(1, numel * torch.empty((), dtype=dtype).element_size()))
        # NOTE: ownership passes to the taker (it unlinks) or the reaper: not this process's resource tracker,
        # which would unlink (and warn about) the segment when this process exits.
        resource_tracker.unregister(shm._name, "shared_memory")  # type: ignore[attr-defined]
        try:
            view = torch.frombuffer(shm.buf, dtype=dtype, count=numel).view(shape)
            fill(view)
            del view  # NOTE: no tensor may reference the mapping when it closes
        except BaseException:
            shm.close()
            shm.unlink()
            raise
        shm.close()
        with self._lock:
            self._pending[name] = time.monotonic() + self.timeout_s
        return {"backend": "shm", "name": name, "shape": list(shape), "dtype": dtype_name}

    @contextlib.contextmanager
    def opened(self, handle: dict[str, Any]) -> Iterator[torch.Tensor]:
        try:
            name, shape, dtype = str(handle["name"]), [int(x) for x in handle["shape"]], DTYPES[handle["dtype"]]
        except (KeyError, TypeError, ValueError) as e:
            raise KVTransferError(f"kv: a handle needs name, shape and dtype ({e})") from None
        if not name.startswith("sgl-kv-"):
            raise KVTransferError(f"kv.name {name!r} is not a KV segment")
        try:
            shm = shared_memory.SharedMemory(name=name)
        except FileNotFoundError:
            raise KVTransferError(f"KV segment {name} is gone (expired after the transfer timeout, or taken)") from None
        try:
            numel = 1
            for n in shape:
                numel *= n
            if numel * torch.empty((), dtype=dtype).element_size() > shm.size:
                raise KVTransferError(f"KV segment {name} is smaller than its shape {shape}")
            view = torch.frombuffer(shm.buf, dtype=dtype, count=numel).view(shape)
            try:
                yield view
            finally:
                del view
        finally:
            shm.close()
            try:
                shm.unlink()  # also unregisters it from this process's resource tracker
            except FileNotFoundError:
                pass

    def pending(self) -> int:
        with self._lock:
            return len(self._pending)

    def reap(self) -> int:
        """Unlink segments past their deadline (taken ones are already gone); returns how many were dropped."""
        now = time.monotonic()
        with self._lock:
            expired = [n for n, deadline in self._pending.items() if deadline <= now]
            for n in expired:
                del self._pending[n]
        for n in expired:
            try:
                seg = shared_memory.SharedMemory(name=n)
            except FileNotFoundError:
                continue  # taken
            seg.close()
            seg.unlink()
        return len(expired)

    def _reap_loop(self) -> None:
        while not self._stop.wait(min(1.0, self.timeout_s / 4)):
            self.reap()

    def close(self) -> None:
        self._stop.set()
        with self._lock:
            for n in self._pending:
                self._pending[n] = 0.0
        self.reap()

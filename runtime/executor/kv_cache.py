"""KV storage: per-layer K and V pools indexed by token slot. Allocation of slots lives in runtime/cache.

    >>> import torch
    >>> kv = KVCache(num_layers=2, num_slots=16, num_kv_heads=1, head_dim=4, dtype=torch.float32)
    >>> kv.store(0, torch.tensor([3, 7]), torch.ones(2, 1, 4), torch.zeros(2, 1, 4))
    >>> kv.k_buffer(0)[7].tolist(), kv.v_buffer(0)[7].tolist()
    ([[1.0, 1.0, 1.0, 1.0]], [[0.0, 0.0, 0.0, 0.0]])
"""

from __future__ import annotations

from typing import Sequence, Union

import torch

from sgl.kernels.dispatch import store_kvcache
from sgl.runtime.memory_probe import drop_pages, resident_bytes
from sgl.runtime.models.config import ModelConfig


KV_DTYPE_NAMES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
                  "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}  # --kv-cache-dtype (runtime/config.py)


def resolve_kv_dtype(name: str, model_dtype: torch.dtype, native: bool) -> torch.dtype:
    """The KV pool's element type for `--kv-cache-dtype name`. auto: fp16 when the weights run native (GGUF blocks
    in the CPU kernels, which read and write fp16 pools; llama.cpp's default KV type), else the model dtype.

        >>> resolve_kv_dtype("auto", torch.float32, native=True), resolve_kv_dtype("auto", torch.float32, native=False)
        (torch.float16, torch.float32)
    """
    if name == "auto":
        return torch.float16 if native else model_dtype
    if name not in KV_DTYPE_NAMES:
        raise ValueError(f"kv_cache_dtype must be auto or one of {sorted(KV_DTYPE_NAMES)}, got {name!r}")
    return KV_DTYPE_NAMES[name]


class KVCache:
    """K and V pools, each [num_layers, num_slots, Hkv, D]; `k_buffer(layer)` is a [num_slots, Hkv, D] view.

    NOTE: the pools are allocated uninitialized; a slot holds garbage until `store` writes it, and
    attention only reads slots of its sequences' slot tables, which were stored first.
    """

    def __init__(
        self,
        num_layers: int,
        num_slots: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: Union[str, torch.device] = "cpu",
    ) -> None:
        assert num_layers >= 1 and num_slots >= 1
        self.num_layers = num_layers
        self.num_slots = num_slots
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.dtype = dtype
        self.device = torch.device(device)
        shape = (num_layers, num_slots, num_kv_heads, head_dim)
        # NOTE: plain 4 KiB pages, NOT huge pages (weight_arena.alloc_huge): the first token stored touches one
        # page per layer and pool, so 2 MiB pages made the default model's first step add 120 MB of resident
        # set (30 layers x K/V x 2 MiB, each page ~2,700 slots of which one was used).
        # Lazily touched pages: the resident KV grows with the slots used (a large pool costs no RSS upfront).
        self.k = torch.empty(shape, dtype=dtype, device=self.device)
        self.v = torch.empty(shape, dtype=dtype, device=self.device)
        self._k_layers = list(self.k.unbind(0))  # [num_slots, Hkv, D] views, one per layer
        self._v_layers = list(self.v.unbind(0))

    @classmethod
    def for_model(
        cls, config: ModelConfig, num_slots: int, dtype: torch.dtype, device: Union[str, torch.device] = "cpu"
    ) -> "KVCache":
        return cls(config.num_hidden_layers, num_slots, config.num_key_value_heads, config.head_dim, dtype, device)

    @staticmethod
    def bytes_per_slot(config: ModelConfig, dtype: Union[torch.dtype, int]) -> int:
        """Bytes one token occupies across all layers (K and V). `dtype`: a torch dtype or its element size."""
        elem = dtype if isinstance(dtype, int) else torch.empty((), dtype=dtype).element_size()
        return 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * elem

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def resident_bytes(self) -> int:
        """Bytes of the pools the OS has mapped so far (first-touched pages; <= nbytes + 4 MiB of pad).
        0 off CPU or off Linux. A soak subtracts it from the RSS to see leaks (runtime/memory_probe.py)."""
        if self.device.type != "cpu":
            return 0
        return resident_bytes([(t.data_ptr(), t.data_ptr() + t.nbytes) for t in (self.k, self.v)])

    @property
    def slot_bytes(self) -> int:
        """Bytes of one slot in one layer's K (or V) pool (768 on the default model: a 4 KiB page holds 5.3
        slots, so a run of free slots gives pages back from 6 slots on)."""
        return self.num_kv_heads * self.head_dim * self.k.element_size()

    def drop_slots(self, runs: Sequence[tuple[int, int]]) -> int:
        """Give the OS back the pages of every layer's K and V pools that lie wholly inside the slot runs
        [start, end) (free slots: their contents are dropped, the next `store` faults in zeroed pages).
        Returns the bytes dropped. NOTE: only for FREE slots: attention reads a slot only after its sequence
        stored it, and a free slot belongs to no sequence. 0 off CPU."""
        if self.device.type != "cpu" or not runs:
            return 0
        per = self.slot_bytes
        ranges = [(t.data_ptr() + a * per, t.data_ptr() + b * per)
                  for t in self._k_layers + self._v_layers for a, b in runs]
        return drop_pages(ranges)

    def k_buffer(self, layer: int) -> torch.Tensor:
        return self._k_layers[layer]  # [num_slots, Hkv, D]

    def v_buffer(self, layer: int) -> torch.Tensor:
        return self._v_layers[layer]  # [num_slots, Hkv, D]

    def store(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write K/V of T tokens. slots: [T] int64; k, v: [T, Hkv, D] (cast to the pool dtype)."""
        if self.device.type == "cpu":
            if k.dtype != self.dtype:  # NOTE: checked in Python: a no-op .to() still costs a dispatch
                k, v = k.to(self.dtype), v.to(self.dtype)
            self._k_layers[layer].index_copy_(0, slots, k)
            self._v_layers[layer].index_copy_(0, slots, v)
        else:
            store_kvcache(self._k_layers[layer], self._v_layers[layer], slots, k, v)  # Triton on CUDA, index_copy_ on CPU

"""Linear weights of the model in native (GGUF block) form, and how they are built at load time.

A linear weight of the model (`LinearWeight`) is one of:
  * a `QuantWeight` [N out, K in] holding GGUF blocks (q4_0, q4_1, q8_0, f16), multiplied by
    sgl.kernels.cpu.quant_linear (its data layout IS the GGUF bytes: row r = K/32 blocks);
  * a float32 Tensor stored transposed, [K in, N out] (the fp32 path, and native-mode fallbacks).

Loaders hand over one `Payload` per Hugging Face name: raw GGUF blocks (`RawBlocks`, views of the
memory-mapped file) or float32 tensors. `fuse_rows` stacks the parts of a fused matrix (qkv = q | k | v
rows, gate_up = gate | up rows):
  * raw parts of ONE kernel-supported qtype: byte rows concatenated (a GGUF row is whole blocks along
    K, so stacking rows is stacking blocks along N): the numbers are exactly the file's;
  * with `quantize` (Hugging Face folders): fp32 rows quantized by gguf.quants (llama.cpp's
    round-to-nearest per 32-block; blocks never cross rows, so fused = per-part quantization);
  * otherwise (q/k/v of different qtypes, a type without a kernel such as Q6_K, F32): ONE fp32
    matrix of the dequantized values. Never requantized: native mode never changes a weight's value.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import dataclasses

import numpy as np
import torch
from gguf import GGMLQuantizationType
from gguf.quants import quantize as gguf_quantize

from sgl.kernels.cpu import QTYPES, QuantWeight, quant_linear
from sgl.kernels.cpu.quant import can_pack, get_act_quant
from sgl.kernels.cpu.quant import row_bytes as quant_row_bytes
from sgl.runtime.models.dequant import dequantize
from sgl.runtime.models.weight_arena import alloc_huge

LinearWeight = Union[torch.Tensor, QuantWeight]


@dataclass(frozen=True)
class RawBlocks:
    """One GGUF tensor's bytes: uint8 [rows, bytes_per_row] in `qtype` ("q4_1", ..., or e.g. "q6_k")."""

    data: np.ndarray
    qtype: str
    shape: tuple[int, int]  # (rows N, columns K), row-major

    def to_float(self) -> torch.Tensor:
        """[N, K] float32, exactly the fp32 path's values."""
        return torch.from_numpy(dequantize(self.data, GGMLQuantizationType[self.qtype.upper()], self.shape))


def native_qtype_supported(qtype: str) -> bool:
    """A GGUF type ("q4_1", "q6_k", "f32", ...) the CPU kernels multiply in place."""
    return qtype in QTYPES


Payload = Union[torch.Tensor, RawBlocks]  # one weight as a loader hands it over: fp32 [N, K] or raw blocks


def gguf_qtype(qtype: GGMLQuantizationType) -> str:
    return qtype.name.lower()


def fuse_rows(parts: list[Payload], quantize: Optional[str]) -> Payload:
    """Stack the parts' rows into one [sum N, K] weight, keeping raw blocks raw when they can stay so.

    Raw parts of one kernel-supported qtype: their byte rows are concatenated (exact). With `quantize`
    (Hugging Face folders): the fp32 rows are quantized by gguf.quants (llama.cpp's round-to-nearest per
    32-block; quantizing the fused matrix equals quantizing each part, blocks never cross rows).
    Anything else (mixed qtypes, types without a kernel such as Q6_K, F32) becomes fp32, never
    requantized, so native mode never changes a weight's value.
    """
    qtypes = {p.qtype if isinstance(p, RawBlocks) else "f32" for p in parts}
    n, k = sum(p.shape[0] for p in parts), parts[0].shape[1]
    if len(qtypes) == 1 and next(iter(qtypes)) in QTYPES and all(isinstance(p, RawBlocks) for p in parts):
        data = parts[0].data if len(parts) == 1 else np.concatenate([p.data for p in parts])
        return RawBlocks(data, parts[0].qtype, (n, k))
    rows = torch.cat([p.to_float() if isinstance(p, RawBlocks) else p.float() for p in parts]).contiguous()
    if quantize is not None and k % 32 == 0:  # (a K that is not whole blocks stays fp32)
        return RawBlocks(gguf_quantize(rows.numpy(), GGMLQuantizationType[quantize.upper()]), quantize, (n, k))
    return rows


def to_linear(p: Payload) -> LinearWeight:
    """A fused payload as the forward pass holds it: QuantWeight for supported raw blocks, else fp32 [K, N]."""
    if isinstance(p, RawBlocks) and p.qtype in QTYPES:
        # NOTE: a view of the read-only file mapping is copied now, so the loader can unmap the file's pages
        # as it goes (GGUFFile.drop_pages): the load's peak is then the weights once, not also the file
        data = np.ascontiguousarray(p.data) if p.data.flags.writeable else np.array(p.data, order="C")
        return QuantWeight.from_gguf(torch.from_numpy(data), p.qtype, p.shape)
    rows = p.to_float() if isinstance(p, RawBlocks) else p
    return rows.t().contiguous()


def describe(p: Payload) -> str:
    return p.qtype if isinstance(p, RawBlocks) else "f32"


def linear(
    x: torch.Tensor,  # [M, K] float32
    w: LinearWeight,
    bias: Optional[torch.Tensor] = None,  # [N]
    residual: Optional[torch.Tensor] = None,  # [M, N]: returned as residual + x @ W^T (+ bias)
) -> torch.Tensor:
    """x @ W^T (+ bias) (+ residual) -> [M, N] float32, for either kind of weight."""
    if isinstance(w, QuantWeight):
        return quant_linear(x, w, bias=bias, residual=residual)
    if residual is None:
        return torch.mm(x, w) if bias is None else torch.addmm(bias, x, w)
    out = torch.addmm(residual, x, w)
    return out if bias is None else out.add_(bias)


def embedding_rows(ids: torch.Tensor, w: LinearWeight) -> torch.Tensor:
    """Rows `ids` [T] of the [V, hidden] table `w` -> [T, hidden] float32; only those rows are dequantized.
    (A Tensor `w` is stored [hidden, V], as every fp32 LinearWeight.)"""
    if isinstance(w, QuantWeight):
        return QuantWeight(w.qtype, (ids.numel(), w.shape[1]), w.data.index_select(0, ids)).dequantize()
    return torch.nn.functional.embedding(ids, w.t())


def rows_as_linear(rows: torch.Tensor, quantize: Optional[str] = None) -> LinearWeight:
    """Output rows [N, hidden] (a draft head's lm_head: some rows of the target's) as a LinearWeight computing their
    N logits: `quantize` blocks for the CPU kernels, or fp32 (stored [hidden, N], as every fp32 LinearWeight)."""
    rows = rows.detach().float().contiguous()
    return to_linear(fuse_rows([rows], quantize)) if quantize is not None else rows.t().contiguous()


def pack_for_act(ws: list[LinearWeight]) -> None:
    """pack_into_arena for the process's activation mode (none under fp32 activations): a draft head's weights, read
    once per draft step."""
    act = get_act_quant()
    if act in ("q8", "q16"):
        pack_into_arena(ws, act)


def pack_into_arena(ws: list[LinearWeight], act: str) -> int:
    """Give the block weights of `ws` that lack one their packed copy for `act` (QuantWeight.pack), all in ONE
    huge-page buffer (weight_arena.alloc_huge), in the order given (a step's order of use): streamed once per decode
    step, the copies read ~1.3x faster on 2 MiB pages than as separate 4 KiB-page allocations (README "Packed layer
    weights"). Returns the bytes allocated (0: nothing to pack, or no copy can run here)."""
    todo = [w for w in ws if isinstance(w, QuantWeight) and act not in w.packed and can_pack(w, act)]
    if not todo:
        return 0
    align = 64
    sizes = [(w.data.numel() + align - 1) // align * align for w in todo]
    arena = alloc_huge(sum(sizes), torch.uint8)
    offset = 0
    for w, size in zip(todo, sizes):
        w.pack(act, arena[offset:offset + w.data.numel()].view(w.data.shape))
        offset += size
    return sum(sizes)


def weight_nbytes(w: LinearWeight) -> int:
    return w.nbytes() if isinstance(w, QuantWeight) else w.numel() * w.element_size()


Slot = tuple[object, str]  # (owner, attribute) of a LinearWeight
PartGroups = dict[Slot, tuple[tuple[str, ...], tuple[int, ...], int]]  # -> (HF part names, their rows, K)


class ArenaPlan:
    """The weight arena laid out BEFORE the weights are read: each fused weight whose parts are all raw blocks of
    one kernel-supported qtype (known from the file's header: `part_qtypes`, HF part name -> qtype) gets its
    slot in `slots` order (a forward pass's), 64-byte aligned, and `fill` copies its parts' rows from the file
    straight into that slot. Why: built afterwards (pack_quant_weights), every weight was first copied out of
    the file mapping and then into the arena, and the load's peak held both copies of the largest one (the
    28.7 MB embedding of the default model) plus the weights not yet packed."""

    def __init__(self, slots: list[Slot], groups: PartGroups, part_qtypes: dict[str, str]) -> None:
        self.plan: dict[Slot, tuple[int, str, int, int]] = {}  # slot -> (offset, qtype, N, K)
        offset = 0
        for slot in slots:
            parts, rows, k = groups[slot]
            qtypes = {part_qtypes.get(p) for p in parts}
            qtype = next(iter(qtypes))
            if len(qtypes) != 1 or qtype not in QTYPES or (qtype != "f16" and k % 32):
                continue  # fused from mixed types, or no kernel: fp32 (fuse_rows), outside the arena
            self.plan[slot] = (offset, qtype, sum(rows), k)
            offset += (sum(rows) * quant_row_bytes(qtype, k) + 63) // 64 * 64
        self.buffer = alloc_huge(max(offset, 1), torch.uint8)  # untouched pages: no resident set until filled

    def fill(self, slot: Slot, parts: list[Payload]) -> Optional[QuantWeight]:
        """The planned slot's QuantWeight with `parts`' rows copied in, or None if the slot is not planned or the
        parts differ from the header's types (then the caller fuses them as before)."""
        if slot not in self.plan:
            return None
        offset, qtype, n, k = self.plan[slot]
        if not all(isinstance(p, RawBlocks) and p.qtype == qtype and p.shape[1] == k for p in parts):
            return None
        if sum(p.shape[0] for p in parts) != n:
            return None
        rb = quant_row_bytes(qtype, k)
        rows = self.buffer[offset : offset + n * rb].view(n, rb).numpy()
        r = 0
        for p in parts:  # a view of the file mapping (or q/k's un-permuted copy): one copy, into the arena
            np.copyto(rows[r : r + p.shape[0]], p.data)
            r += p.shape[0]
        return QuantWeight.from_gguf(self.buffer[offset : offset + n * rb], qtype, (n, k))

    def holds_all(self, slots: list[Slot]) -> bool:
        """Every QuantWeight at `slots` lives in this arena (else pack_quant_weights must build one)."""
        lo, hi = self.buffer.data_ptr(), self.buffer.data_ptr() + self.buffer.numel()
        return all(not isinstance(o.__dict__[a], QuantWeight) or lo <= o.__dict__[a].data.data_ptr() < hi
                   for o, a in slots)


def pack_quant_weights(slots: list[tuple[object, str]]) -> torch.Tensor:
    """Move the QuantWeights at `owner.__dict__[attr]` into one huge-page buffer, in the given order
    (the order a forward pass reads them: see weight_arena.py for why), 64-byte aligned each.
    Afterwards nothing refers to the loader's bytes (the file mapping can close). Returns the buffer."""
    found = [(owner, attr) for owner, attr in slots if isinstance(owner.__dict__[attr], QuantWeight)]
    sizes = [(owner.__dict__[attr].nbytes() + 63) // 64 * 64 for owner, attr in found]
    buf = alloc_huge(sum(sizes), torch.uint8)
    offset = 0
    for (owner, attr), size in zip(found, sizes):
        w = owner.__dict__[attr]
        view = buf[offset : offset + w.nbytes()].view(w.data.shape)
        view.copy_(w.data)
        # NOTE: the loader's copy is freed here, one weight at a time (nothing else holds it), so the peak
        # is about one arena plus one weight, not two arenas
        owner.__dict__[attr] = dataclasses.replace(w, data=view)
        offset += size
    return buf

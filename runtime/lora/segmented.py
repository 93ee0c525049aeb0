"""The batched LoRA update of one step (Punica/S-LoRA's segmented gather matmul, on the CPU).

The model runner orders a batch's rows by adapter, so each adapter's tokens form one contiguous
segment of the [T, ...] activations. After each base linear (run once for ALL rows, either weight
format), every segment g adds its low-rank update in place:

    out[s_g:e_g] += (x[s_g:e_g] @ A_g) @ B_g        A_g: [in, R_g], B_g: [R_g, out] (scale folded in)

Rows without an adapter form no segment and get nothing. Cost: two small matmuls per adapter
segment and linear, exact FLOPs. With many short segments (a decode batch over several adapters)
the per-op overhead of that loop dominates on a CPU, so the same update runs as ONE padded batched
matmul instead (`StackedLoras`): the segments' rows are gathered into [G, L, in] (L = the longest
segment, padding rows zeroed), multiplied by the adapters' A and B stacked (and zero-padded to a
common rank) as [G, in, R] and [G, R, out], and added back with index_add_: 5 ops per linear,
whatever G. The stacks are built once per set of adapters and cached (`StackCache`).

    >>> import torch
    >>> seg = LoraBatch([LoraSegment(1, 3, [{"o": (torch.ones(2, 1), torch.ones(1, 2))}])])
    >>> out = torch.zeros(3, 2); seg.apply(out, torch.ones(3, 2), 0, "o"); out.tolist()
    [[0.0, 0.0], [2.0, 2.0], [2.0, 2.0]]
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import torch

AdapterLayers = list[dict[str, tuple[torch.Tensor, torch.Tensor]]]  # LoraAdapter.layers


@dataclass
class LoraSegment:
    start: int  # first token row
    end: int  # one past the last token row
    layers: AdapterLayers  # the adapter's per-layer (A, B) pairs


# Use the padded batched matmul from this many segments on, while padding at most doubles the rows.
STACK_MIN_SEGMENTS = 3
StackedLayers = list[dict[str, tuple[torch.Tensor, torch.Tensor]]]  # per layer: linear -> ([G, in, R], [G, R, out])


class StackCache:
    """Stacked A/B of recently seen adapter sets (key: the adapters' uids in segment order)."""

    def __init__(self, capacity: int = 4) -> None:
        self.capacity = capacity
        self._stacks: "OrderedDict[tuple[int, ...], StackedLayers]" = OrderedDict()

    def get(self, uids: tuple[int, ...], all_layers: list[AdapterLayers]) -> StackedLayers:
        stacked = self._stacks.get(uids)
        if stacked is None:
            stacked = self._stacks[uids] = stack_adapters(all_layers)
            while len(self._stacks) > self.capacity:
                self._stacks.popitem(last=False)
        self._stacks.move_to_end(uids)
        return stacked


def stack_adapters(all_layers: list[AdapterLayers]) -> StackedLayers:
    """Per layer and linear: the adapters' A as [G, in, R] and B as [G, R, out], ranks zero-padded to
    the largest R (zero columns of A and rows of B add nothing); an adapter without the linear is all zeros."""
    out: StackedLayers = []
    for layer in range(len(all_layers[0])):
        per_linear: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        names = {name for layers in all_layers for name in layers[layer]}
        for name in names:
            pairs = [layers[layer].get(name) for layers in all_layers]
            a0, b0 = next(p for p in pairs if p is not None)
            r = max(p[0].shape[1] for p in pairs if p is not None)
            a_st = torch.zeros(len(pairs), a0.shape[0], r, dtype=a0.dtype)
            b_st = torch.zeros(len(pairs), r, b0.shape[1], dtype=b0.dtype)
            for g, p in enumerate(pairs):
                if p is not None:
                    a_st[g, :, : p[0].shape[1]] = p[0]
                    b_st[g, : p[1].shape[0]] = p[1]
            per_linear[name] = (a_st, b_st)
        out.append(per_linear)
    return out


class StackedLoras:
    """The padded batched form of a batch's segments: gather index [G * L] and row mask [G * L, 1]."""

    def __init__(self, segments: list[LoraSegment], stacked: StackedLayers, device: torch.device) -> None:
        self.groups = len(segments)
        self.length = max(seg.end - seg.start for seg in segments)
        idx, valid = [], []
        for seg in segments:
            n = seg.end - seg.start
            idx += list(range(seg.start, seg.end)) + [seg.start] * (self.length - n)  # pads repeat a real row...
            valid += [1.0] * n + [0.0] * (self.length - n)  # ...whose copy is zeroed, so it adds nothing
        self.index = torch.tensor(idx, dtype=torch.int64, device=device)
        self.valid = None if all(valid) else torch.tensor(valid, device=device).unsqueeze(1)
        self.stacked = stacked

    def apply(self, out: torch.Tensor, x: torch.Tensor, layer_id: int, linear: str) -> None:
        pair = self.stacked[layer_id].get(linear)
        if pair is None:
            return
        a, b = pair  # [G, in, R], [G, R, N]
        xs = x.index_select(0, self.index)  # [G * L, in]
        if self.valid is not None:
            xs.mul_(self.valid.to(xs.dtype))
        delta = torch.bmm(torch.bmm(xs.view(self.groups, self.length, -1), a), b)  # [G, L, N]
        out.index_add_(0, self.index, delta.view(self.groups * self.length, -1))


class LoraBatch:
    """The adapter segments of one forward batch (attached to ForwardBatch.lora)."""

    def __init__(self, segments: list[LoraSegment], stacked: Optional[StackedLoras] = None) -> None:
        self.segments = segments
        self.stacked = stacked

    def apply(self, out: torch.Tensor, x: torch.Tensor, layer_id: int, linear: str) -> None:
        """out [T, N] += each segment's x @ A @ B for the fused `linear` of layer `layer_id`."""
        if self.stacked is not None:
            self.stacked.apply(out, x, layer_id, linear)
            return
        for seg in self.segments:
            pair = seg.layers[layer_id].get(linear)
            if pair is None:  # this adapter does not target this linear
                continue
            a, b = pair
            out[seg.start:seg.end].addmm_(x[seg.start:seg.end] @ a, b)

    @classmethod
    def from_rows(cls, extend_lens: Sequence[int], adapters: Sequence[Optional[Any]],
                  stack_cache: Optional[StackCache] = None, device: Union[str, torch.device] = "cpu",
                  min_segments: int = STACK_MIN_SEGMENTS) -> Optional["LoraBatch"]:
        """Segments from per-row token counts and adapters (rows already ordered so that equal
        adapters are adjacent); None when no row has an adapter. With a `stack_cache`, many short
        segments run as one padded batched matmul (see the module docstring)."""
        segments: list[LoraSegment] = []
        seg_adapters: list[Any] = []
        start = 0
        prev: Optional[Any] = None
        for n, adapter in zip(extend_lens, adapters):
            if adapter is not None:
                if adapter is prev:
                    segments[-1].end += n
                else:
                    assert adapter.layers is not None, f"adapter {adapter.name} is not resident"
                    segments.append(LoraSegment(start, start + n, adapter.layers))
                    seg_adapters.append(adapter)
            prev = adapter
            start += n
        if not segments:
            return None
        rows = sum(seg.end - seg.start for seg in segments)
        longest = max(seg.end - seg.start for seg in segments)
        if stack_cache is not None and len(segments) >= min_segments and len(segments) * longest <= 2 * rows:
            stacked = stack_cache.get(tuple(a.uid for a in seg_adapters), [seg.layers for seg in segments])
            return cls(segments, StackedLoras(segments, stacked, torch.device(device)))
        return cls(segments)


def lora_order(adapters: Sequence[Optional[Any]]) -> Optional[list[int]]:
    """A stable row order grouping equal adapters (base rows first), or None when no row has one."""
    if all(a is None for a in adapters):
        return None
    return sorted(range(len(adapters)), key=lambda i: 0 if adapters[i] is None else adapters[i].uid)


def lora_delta_reference(x: torch.Tensor, row_layers: Sequence[Optional[AdapterLayers]], layer_id: int,
                         linear: str, out_features: int) -> torch.Tensor:
    """The torch reference: token by token, x_t @ A @ B of its row's adapter (zeros for none). [T, N]."""
    delta = torch.zeros(x.shape[0], out_features, dtype=x.dtype)
    for t, layers in enumerate(row_layers):
        if layers is None or linear not in layers[layer_id]:
            continue
        a, b = layers[layer_id][linear]
        delta[t] = (x[t:t + 1] @ a @ b)[0]
    return delta

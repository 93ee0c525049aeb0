"""The batched LoRA update of one step (Punica/S-LoRA's segmented gather matmul, on the CPU).

The model runner orders a batch's rows by adapter, so each adapter's tokens form one contiguous
segment of the [T, ...] activations. After each base linear (run once for ALL rows, either weight
format), every segment g adds its low-rank update in place:

    out[s_g:e_g] += (x[s_g:e_g] @ A_g) @ B_g        A_g: [in, R_g], B_g: [R_g, out] (scale folded in)

Rows without an adapter form no segment and get nothing. Cost: two small matmuls per adapter
segment and linear; no per-row gather of adapter weights and no padding to a common rank.

    >>> import torch
    >>> seg = LoraBatch([LoraSegment(1, 3, [{"o": (torch.ones(2, 1), torch.ones(1, 2))}])])
    >>> out = torch.zeros(3, 2); seg.apply(out, torch.ones(3, 2), 0, "o"); out.tolist()
    [[0.0, 0.0], [2.0, 2.0], [2.0, 2.0]]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

AdapterLayers = list[dict[str, tuple[torch.Tensor, torch.Tensor]]]  # LoraAdapter.layers


@dataclass
class LoraSegment:
    start: int  # first token row
    end: int  # one past the last token row
    layers: AdapterLayers  # the adapter's per-layer (A, B) pairs


class LoraBatch:
    """The adapter segments of one forward batch (attached to ForwardBatch.lora)."""

    def __init__(self, segments: list[LoraSegment]) -> None:
        self.segments = segments

    def apply(self, out: torch.Tensor, x: torch.Tensor, layer_id: int, linear: str) -> None:
        """out [T, N] += each segment's x @ A @ B for the fused `linear` of layer `layer_id`."""
        for seg in self.segments:
            pair = seg.layers[layer_id].get(linear)
            if pair is None:  # this adapter does not target this linear
                continue
            a, b = pair
            out[seg.start:seg.end].addmm_(x[seg.start:seg.end] @ a, b)

    @classmethod
    def from_rows(cls, extend_lens: Sequence[int], adapters: Sequence[Optional[Any]]) -> Optional["LoraBatch"]:
        """Segments from per-row token counts and adapters (rows already ordered so that equal
        adapters are adjacent); None when no row has an adapter."""
        segments: list[LoraSegment] = []
        start = 0
        prev: Optional[Any] = None
        for n, adapter in zip(extend_lens, adapters):
            if adapter is not None:
                if adapter is prev:
                    segments[-1].end += n
                else:
                    assert adapter.layers is not None, f"adapter {adapter.name} is not resident"
                    segments.append(LoraSegment(start, start + n, adapter.layers))
            prev = adapter
            start += n
        return cls(segments) if segments else None


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

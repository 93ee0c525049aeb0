"""Native decode: the Llama decoder stack in ONE C++ call (sgl.kernels.cpu.decode_layer) where it applies.

`LlamaForCausalLM.forward` asks `fused_step(...)` once per step; it returns a runner for the step's whole
decoder (every layer in ONE call, `decode_stack`, when every layer fuses: one Python -> C++ transition per
step) when the step is one decode token of one sequence, the model holds native GGUF weights, the activations
run in q16 (the process default) or q8 (the kernel computes what the unfused path of that mode computes), no
LoRA, and the extension has the kernel. Otherwise None, and every layer runs `LlamaDecoderLayer.forward` (the torch
path, which stays the reference the tests compare against). A layer whose weights cannot fuse (an fp32
fallback, f16 blocks, a tensor-parallel shard) runs its own forward inside a fused step.

Why: at batch 1 the unfused layer is ~15 small torch ops and 4 GEMV calls, each small op running cold after
a ~2 MB weight stream and each call a fork/join of the thread pool; profile: benchmarks/profile_decode_step.py.
`ENABLED = False` turns the path off (the profile's A/B and the tests).

A step of 2..64 token rows with the same conditions runs `decode_rows`: the stack for all rows in one call, each row
with the bits decode_stack gives that token alone, so a decode batch is batch-invariant and a verify row computes
what the decode step without speculation computes (a step of generated tokens that holds some sequence's several,
verify rows, runs it past 64 rows too, in chunks of 64 in row order). That holds for generated tokens (a decode
batch, speculative verify rows) and for a short step's prompt tokens too (at most SHORT_STEP_ROWS tokens in all: a
short prompt, the last chunk of a long one, a few prompts joining a decode batch), where the rows' q16 GEMM beats
the prefill path's small-M fp32 GEMM (~1.5x at 8..64 tokens, 1 thread: README "Short prompts as decode rows");
longer steps keep the prefill path (from 96 rows MKL on dequantized weights, faster per token than the tile). Row
t's slot list is its sequence's slot table up to its own slot (a tree node's: the prefix, its ancestors and itself).
`ROWS_ENABLED = False` keeps such steps on the torch path.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Optional

import torch

from sgl.kernels.cpu import _ext
from sgl.kernels.cpu.attention import KV_DTYPES
from sgl.kernels.cpu.decode_layer import (MAX_ROWS, QTYPE_CODE, DecodeLayerWeights, DecodeStack, decode_layer,
                                         decode_rows, decode_stack)
from sgl.kernels.cpu.quant import QuantWeight, get_act_quant
from sgl.runtime.executor.forward_batch import ForwardBatch
from sgl.runtime.executor.kv_cache import KVCache
from sgl.runtime.models.native_weights import pack_into_arena
from sgl.runtime.models.rotary import RopeTables

if TYPE_CHECKING:
    from sgl.runtime.models.llama import LlamaDecoderLayer, LlamaForCausalLM

ENABLED = True
ROWS_ENABLED = True
SHORT_STEP_ROWS = MAX_ROWS  # a step of at most this many tokens runs decode_rows whole, prompt tokens included
FUSED_ACTS = ("q16", "q8")  # the activation modes the fused kernels compute (decode_layer.py's ACT_CODE)
# (h, rope tables, lo, hi) -> h after layers [lo, hi) (hi None: to the last layer)
StackRunner = Callable[[torch.Tensor, RopeTables, int, Optional[int]], torch.Tensor]


def layer_weights(layer: "LlamaDecoderLayer", pack: bool = False) -> Optional[DecodeLayerWeights]:
    """The layer's DecodeLayerWeights (built once, rebuilt if a weight was replaced), or None if it cannot fuse.
    `pack`: give its weights their q8 packed copies first (QuantWeight.pack; the q8 kernels then read them)."""
    ws = tuple(layer.__dict__.get(name) for name in layer.LINEARS)
    key = (tuple(map(id, ws)), pack)
    cached = layer.__dict__.get("_fused_weights")
    if cached is not None and cached[0] == key:
        return cached[1]
    ok = (layer.all_reduce is None and all(type(w) is QuantWeight and w.qtype in QTYPE_CODE for w in ws)
          and layer.input_layernorm.dtype == torch.float32)
    built = None
    if ok:
        qkv, o, gate_up, down = ws
        for w in ws if pack else ():  # a no-op for the copies model_stack's arena made
            w.pack("q8")  # NOTE: False (no copy) where it cannot run: the kernels read the GGUF rows
        built = DecodeLayerWeights(
            layer.input_layernorm.detach(), layer.post_attention_layernorm.detach(), float(layer.norm_consts.eps),
            qkv, None if layer.qkv_bias is None else layer.qkv_bias.detach(), o,
            None if layer.o_bias is None else layer.o_bias.detach(), gate_up, down,
            layer.num_heads, layer.num_kv_heads, layer.head_dim)
    layer.__dict__["_fused_weights"] = (key, built)
    return built


def packs_weights(model: "LlamaForCausalLM") -> bool:
    """Whether the model's block weights get packed copies (QuantWeight.pack) for the current activation mode: on
    unless the engine turned it off (`--disable-cpu-weight-packing`: `model.pack_weights = False`)."""
    return getattr(model, "pack_weights", True)


def model_stack(model: "LlamaForCausalLM", kv: KVCache) -> Optional[DecodeStack]:
    """Every layer's weights and KV pool as one DecodeStack (cached on the model, rebuilt when a layer's weights
    or the pool change), or None when a layer cannot fuse or the layers' attention scales differ. Under q8
    activations the layers' weights get their packed copies (README "Packed layer weights")."""
    pack = get_act_quant() == "q8" and packs_weights(model)
    if pack and not model.__dict__.get("_layers_packed"):  # once: every layer's copies in one huge-page arena, in
        # the step's order (~23 us a step when asked every step); a weight replaced later gets its own copy in
        # layer_weights
        pack_into_arena([getattr(layer, n) for layer in model.layers for n in layer.LINEARS], "q8")
        model.__dict__["_layers_packed"] = True
    ws = [layer_weights(layer, pack) for layer in model.layers]
    key = (tuple(map(id, ws)), id(kv), kv.k_buffer(0).data_ptr())
    cached = model.__dict__.get("_fused_stack")
    if cached is not None and cached[0] == key:
        return cached[1]
    stack = None
    if all(w is not None for w in ws) and len({layer.scale for layer in model.layers}) == 1:
        n = len(ws)
        stack = DecodeStack(tuple(ws), tuple(kv.k_buffer(i) for i in range(n)), tuple(kv.v_buffer(i) for i in range(n)))
    model.__dict__["_fused_stack"] = (key, stack, ws)  # NOTE: holds ws, so the ids in the key stay theirs
    return stack


def fused_step(model: "LlamaForCausalLM", h: torch.Tensor, fb: ForwardBatch, kv: KVCache) -> Optional[StackRunner]:
    """A runner `(h, rope_tables) -> h` for this step's decoder layers, or None (run the torch path)."""
    ext = _fusable(model, fb, kv)
    if ext is None or not hasattr(ext, "decode_layer"):
        return None
    if h.shape[0] > 1:
        return _rows_step(model, fb, kv, ext)
    d = fb.attn.decode
    if d is None or d.batch_size != 1 or d.rows is not None:
        return _rows_step(model, fb, kv, ext)
    slots = fb.slot_tables[0]
    if slots.dtype != torch.int64 or not slots.is_contiguous() or slots.device.type != "cpu":
        return None
    stack = model_stack(model, kv)
    act = get_act_quant()

    def run(x: torch.Tensor, rope_tables: RopeTables, lo: int = 0, hi: Optional[int] = None) -> torch.Tensor:
        hi = len(model.layers) if hi is None else hi
        cos, sin = rope_tables.cos.reshape(-1).contiguous(), rope_tables.sin_signed.reshape(-1).contiguous()  # [D]
        if not x.is_contiguous():
            x = x.contiguous()
        if stack is not None:
            return decode_stack(x, stack.part(lo, hi), cos, sin, slots, model.layers[0].scale, check=False, act=act)
        for i in range(lo, hi):  # some layer cannot fuse: layer by layer
            layer = model.layers[i]
            w = layer_weights(layer, act == "q8" and packs_weights(model))
            if w is None:
                x = layer.forward(x, rope_tables, model.rope, fb, kv, i)
            else:
                x = decode_layer(x, w, cos, sin, kv.k_buffer(i), kv.v_buffer(i), slots, layer.scale, check=False,
                                 act=act)
        return x

    return run


def _fusable(model: "LlamaForCausalLM", fb: ForwardBatch, kv: KVCache) -> Optional[object]:
    """The extension when the conditions of the fused paths that do not depend on the step's shape hold (native
    weights, no LoRA, an fp32 or fp16 CPU KV pool, q16 or q8 activations), else None."""
    if not (ENABLED and getattr(model, "native", False) and fb.lora is None and kv.dtype in KV_DTYPES
            and kv.device.type == "cpu" and get_act_quant() in FUSED_ACTS):
        return None
    return _ext.load()


def _rows_possible(model: "LlamaForCausalLM", fb: ForwardBatch, kv: KVCache) -> bool:
    ext = _fusable(model, fb, kv)
    return ROWS_ENABLED and hasattr(ext, "decode_rows") and model_stack(model, kv) is not None


def fuses_decode_tails(model: object, fb: ForwardBatch, kv: KVCache) -> bool:
    """Whether `model.forward` runs this step's decode tails (fb.decode_tails: generated tokens and final prompt
    tokens) as decode rows: then a prompt's first output token has the same bits whether the prompt was
    prefilled or found in the cache, and a decode row the same bits whether a prefill shares its step."""
    from sgl.runtime.models.llama import LlamaForCausalLM

    return (isinstance(model, LlamaForCausalLM) and fb.decode_tails is not None and any(fb.decode_tails)
            and fb.tree_masks is None and _rows_possible(model, fb, kv))


def split_decode_tails(model: "LlamaForCausalLM", fb: ForwardBatch,
                       kv: KVCache) -> Optional[tuple[Optional[ForwardBatch], ForwardBatch, torch.Tensor, torch.Tensor]]:
    """(the step's other tokens or None, its decode tails as decode rows, the token rows of each in fb) when the
    step mixes prompt tokens with decode tails; else None (a generated-only or short step runs decode_rows whole).
    The first part runs first (it writes the K/V the tails attend to)."""
    if fb.generated_only or fb.num_tokens <= SHORT_STEP_ROWS or not fuses_decode_tails(model, fb, kv):
        return None
    tails = fb.decode_tails
    if sum(tails) > MAX_ROWS and not holds_chains(tails):
        return None
    ids = fb.input_ids.tolist()
    head_ids, head_tables, head_rows, tail_ids, tail_tables, tail_rows = [], [], [], [], [], []
    end = 0
    for ext, seq, table, n in zip(fb.extend_lens, fb.seq_lens, fb.slot_tables, tails):
        begin, end = end, end + ext
        keep = ext - n
        if keep > 0:
            head_ids.append(ids[begin : begin + keep])
            head_tables.append(table[: seq - n])
            head_rows.extend(range(begin, begin + keep))
        if n > 0:
            tail_ids.append(ids[begin + keep : end])
            tail_tables.append(table)
            tail_rows.extend(range(begin + keep, end))
    device = fb.input_ids.device
    head = ForwardBatch.from_lists(head_ids, head_tables, device=device) if head_ids else None
    tail = ForwardBatch.from_lists(tail_ids, tail_tables, device=device, generated_only=True)
    return head, tail, torch.tensor(head_rows, dtype=torch.int64), torch.tensor(tail_rows, dtype=torch.int64)


def row_slot_lists(fb: ForwardBatch) -> Optional[tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]]:
    """(addresses [T], lengths [T], the tensors that own them) of every token row's slot list, or None when a
    slot table is not a contiguous int64 CPU tensor. A chain row's list is a prefix of its table (no copy);
    a tree node's is built: the prefix and pending slots it sees, then its ancestors and itself."""
    addrs: list[int] = []
    lens: list[int] = []
    owners: list[torch.Tensor] = []
    for b, (table, ext, seq) in enumerate(zip(fb.slot_tables, fb.extend_lens, fb.seq_lens)):
        if table.dtype != torch.int64 or not table.is_contiguous() or table.device.type != "cpu":
            return None
        mask = None if fb.tree_masks is None else fb.tree_masks[b]
        prefix = seq - ext
        if mask is None:
            addrs.extend([table.data_ptr()] * ext)
            lens.extend(range(prefix + 1, seq + 1))
            owners.append(table)
            continue
        new = table[prefix:]
        for j in range(ext):
            row = torch.cat((table[:prefix], new[mask[j]]))
            addrs.append(row.data_ptr())
            lens.append(row.numel())
            owners.append(row)
    return torch.tensor(addrs, dtype=torch.int64), torch.tensor(lens, dtype=torch.int64), owners


def holds_chains(lens: list[int]) -> bool:
    """Whether a step's generated tokens (per sequence: `lens`) hold some sequence's several (speculative verify rows,
    forced text). Such a step runs as decode rows past MAX_ROWS too: each token must get the bits a decode step gives
    it alone, or greedy output with speculation is not the output without it (8 requests drafting 8 tokens are 72
    rows; on the prefill path 7 of the crossover benchmark's 8 outputs differed). A step of single decode tokens past
    MAX_ROWS keeps the prefill path (MKL)."""
    return any(n > 1 for n in lens)


def _rows_step(model: "LlamaForCausalLM", fb: ForwardBatch, kv: KVCache, ext: object) -> Optional[StackRunner]:
    short = fb.num_tokens <= SHORT_STEP_ROWS and fb.tree_masks is None  # prompt rows too (module docstring)
    chains = fb.generated_only and holds_chains(fb.extend_lens)  # decode rows past MAX_ROWS too (holds_chains)
    if not (ROWS_ENABLED and (fb.generated_only or short) and (fb.num_tokens <= MAX_ROWS or chains)
            and hasattr(ext, "decode_rows")):
        return None
    stack = model_stack(model, kv)
    lists = row_slot_lists(fb) if stack is not None else None
    if lists is None:
        return None
    addrs, lens, owners = lists
    act = get_act_quant()

    def run(x: torch.Tensor, rope_tables: RopeTables, lo: int = 0, hi: Optional[int] = None) -> torch.Tensor:
        t = x.shape[0]
        cos = rope_tables.cos.reshape(t, -1).contiguous()  # [T, D]
        sin = rope_tables.sin_signed.reshape(t, -1).contiguous()
        if not x.is_contiguous():
            x = x.contiguous()
        decode_rows(x, stack.part(lo, len(model.layers) if hi is None else hi), cos, sin, addrs, lens,
                    model.layers[0].scale, act=act)  # (past MAX_ROWS rows: calls of MAX_ROWS, in row order)
        return x

    run.owners = owners  # type: ignore[attr-defined]  # NOTE: addrs point into them: alive as long as run

    return run

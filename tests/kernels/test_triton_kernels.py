"""The Triton kernels against their torch references, on this CPU-only machine.

- Interpreter: each kernel runs under TRITON_INTERPRET=1 on CPU tensors and must match the torch
  reference (the CPU path). TRITON_INTERPRET is read when `@triton.jit` decorates a kernel, so the
  checks run in ONE child process (this file run as a script) started with the variable set; each
  check reports separately and a test below asserts its result.
- Compiler: each kernel compiles ahead of time for sm_80 (no GPU needed), which catches what the
  interpreter accepts but the GPU compiler rejects (dot shapes, dtype mixes) and checks shared memory.
- Dispatch: on CPU the runtime's entry points run the references; `sgl.kernels` imports without triton.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import subprocess
import sys
import traceback
from typing import Callable

import pytest

HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed (pip install -e '.[test]')")
CHILD_ENV = {"OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "TRITON_DEFAULT_FP_FUSION": "1"}

pytestmark = pytest.mark.timeout(300)


# ----------------------------------------------------------------------------- interpreter checks
# These run in the child process (TRITON_INTERPRET=1); torch/triton are imported there.

def check_store() -> None:
    import torch

    from sgl.kernels.triton_kv_store import store_kvcache
    from sgl.runtime.executor.kv_cache import KVCache

    rng = random.Random(0)
    for num_kv_heads, head_dim, pool_dtype in [(1, 64, torch.float32), (3, 48, torch.float32),
                                               (2, 64, torch.float16), (2, 80, torch.bfloat16)]:
        num_slots, T = 50, rng.randint(1, 12)
        slots = torch.tensor(rng.sample(range(num_slots), T))  # distinct, unordered
        # k and v as views of a fused qkv projection: token stride != Hkv * D
        qkv = torch.randn(T, 4 + 2 * num_kv_heads, head_dim)
        k, v = qkv[:, 4 : 4 + num_kv_heads], qkv[:, 4 + num_kv_heads :]
        ref = KVCache(1, num_slots, num_kv_heads, head_dim, pool_dtype)  # CPU: index_copy_
        ref.k.fill_(7.0), ref.v.fill_(7.0)
        ref.store(0, slots, k, v)
        kp = torch.full((num_slots, num_kv_heads, head_dim), 7.0, dtype=pool_dtype)
        vp = kp.clone()
        store_kvcache(kp, vp, slots, k, v)
        what = f"Hkv={num_kv_heads} D={head_dim} {pool_dtype}"
        if pool_dtype == torch.bfloat16:
            # NOTE: the interpreter rounds fp32 -> bf16 toward zero (numpy bit truncation); the GPU and
            # torch round to nearest even: allow one bf16 ulp (2^-7 relative).
            for got, want in ((kp, ref.k_buffer(0)), (vp, ref.v_buffer(0))):
                torch.testing.assert_close(got.float(), want.float(), rtol=2**-7, atol=0, msg=what)
        else:
            assert torch.equal(kp, ref.k_buffer(0)) and torch.equal(vp, ref.v_buffer(0)), what
    # negative slots are skipped; int32 slots work
    kp = torch.zeros(4, 1, 16)
    vp = torch.zeros(4, 1, 16)
    k = torch.randn(3, 1, 16)
    store_kvcache(kp, vp, torch.tensor([2, -1, 0], dtype=torch.int32), k, -k)
    assert torch.equal(kp[2], k[0]) and torch.equal(vp[0], -k[2]) and not kp[[1, 3]].any()


def check_bitmask() -> None:
    import torch

    from sgl.kernels.bitmask import apply_token_bitmask_ as ref_apply
    from sgl.kernels.triton_bitmask import apply_token_bitmask_ as tri_apply

    g = torch.Generator().manual_seed(0)
    rng = random.Random(0)
    cases = [
        # B, V, W, indices, dtype, block
        (3, 100, 4, None, torch.float32, 1024),  # 32 W = 128 > V: bits past V ignored
        (4, 100, 2, None, torch.float32, 32),  # 32 W = 64 < V: columns past 64 masked
        (5, 257, 9, [4, 0, 2], torch.float32, 64),
        (5, 257, 3, [3], torch.float16, 1024),
        (2, 70, 3, [], torch.float32, 1024),
        (3, 33, 1, torch.tensor([2, 1]), torch.bfloat16, 32),
        (6, 1000, 32, None, torch.float16, 128),
    ]
    for B, V, W, indices, dtype, block in cases:
        bitmask = torch.randint(-(2**31), 2**31 - 1, (B + 1, W), dtype=torch.int32, generator=g)  # B' > B rows
        bitmask[rng.randrange(B)] = -1  # an unconstrained row
        wide = torch.randn(B, V + 5, generator=g).to(dtype)
        logits = wide[:, 2 : V + 2]  # non-contiguous rows
        want = logits.clone()
        ref_apply(want, bitmask, indices)
        tri_apply(logits, bitmask, indices, block=block)
        what = f"B={B} V={V} W={W} indices={indices} {dtype} block={block}"
        assert torch.equal(logits, want), what
        assert torch.isfinite(wide[:, :2]).all() and torch.isfinite(wide[:, V + 2 :]).all(), f"{what}: wrote outside"
    for bad in ([3], [-1]):
        try:
            tri_apply(torch.zeros(3, 8), torch.zeros(3, 1, dtype=torch.int32), bad)
        except ValueError:
            continue
        raise AssertionError(f"indices {bad} accepted for 3 rows")


def _attention_case(rng: random.Random, num_heads: int, num_kv_heads: int, head_dim: int, mode: str,
                    max_seq: int = 40, dtype=None):
    """A random batch over a NaN-filled pool: only slots of the slot tables hold K/V, so a kernel that
    reads a pad or a foreign slot produces NaN. Tables are random (non-contiguous) slot ids."""
    import torch

    from sgl.kernels.attention import AttentionMetadata

    dtype = dtype or torch.float32
    batch = rng.randint(1, 5)
    extend_lens, seq_lens = [], []
    for _ in range(batch):
        seq = rng.randint(2 if mode == "extend" else 1, max_seq)
        if mode == "decode":
            ext = 1
        elif mode == "extend":  # prefix lengths 0 .. seq - 2
            ext = rng.choice([seq, rng.randint(2, seq)])
        else:  # mixed: decode, pure prefill and chunked extend
            ext = rng.choice([1, seq, rng.randint(1, seq)])
        extend_lens.append(ext)
        seq_lens.append(seq)
    num_slots = sum(seq_lens) + 13
    free = rng.sample(range(num_slots), sum(seq_lens))
    tables = [[free.pop() for _ in range(s)] for s in seq_lens]
    k_buf = torch.full((num_slots, num_kv_heads, head_dim), float("nan"), dtype=dtype)
    v_buf = k_buf.clone()
    used = torch.tensor([s for t in tables for s in t])
    k_buf[used] = torch.randn(used.numel(), num_kv_heads, head_dim).to(dtype)
    v_buf[used] = torch.randn(used.numel(), num_kv_heads, head_dim).to(dtype)
    # q as a view of a fused projection (non-contiguous token stride, like the model's)
    T = sum(extend_lens)
    q = torch.randn(T, num_heads + num_kv_heads, head_dim).to(dtype)[:, :num_heads]
    meta = AttentionMetadata.build(extend_lens, seq_lens, tables)
    return q, k_buf, v_buf, meta, (extend_lens, seq_lens, tables)


SHAPES = [(4, 4, 64), (6, 2, 48), (8, 2, 64), (3, 1, 16)]  # (H, Hkv, D): GQA 1, 3, 4, 3; D=48 not a power of two


def check_decode() -> None:
    import torch

    from sgl.kernels.attention import paged_attention as ref
    from sgl.kernels.triton_attention import PagedIndex, paged_decode_attention

    rng = random.Random(1)
    for num_heads, num_kv_heads, head_dim in SHAPES:
        for num_splits, block_n, max_seq in [(1, 16, 40), (3, 16, 70), (None, 16, 200), (2, None, 130)]:
            q, k_buf, v_buf, meta, lists = _attention_case(rng, num_heads, num_kv_heads, head_dim, "decode", max_seq)
            scale = head_dim**-0.5
            want = ref(q, k_buf, v_buf, meta, scale)
            for index in (PagedIndex.build(*lists), PagedIndex.from_metadata(meta)):
                out = torch.full_like(want, float("nan"))
                paged_decode_attention(q, k_buf, v_buf, index, scale, out, num_splits=num_splits, block_n=block_n)
                what = f"H={num_heads} Hkv={num_kv_heads} D={head_dim} splits={num_splits} block_n={block_n} {lists[1]}"
                torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5, msg=what)


def check_extend() -> None:
    import torch

    from sgl.kernels.attention import paged_attention as ref
    from sgl.kernels.triton_attention import PagedIndex, paged_extend_attention

    rng = random.Random(2)
    for num_heads, num_kv_heads, head_dim in SHAPES:
        for block_m, block_n, max_seq in [(16, 16, 40), (16, 32, 70), (None, None, 90)]:
            q, k_buf, v_buf, meta, lists = _attention_case(rng, num_heads, num_kv_heads, head_dim, "extend", max_seq)
            scale = head_dim**-0.5
            want = ref(q, k_buf, v_buf, meta, scale)
            out = torch.full_like(want, float("nan"))
            paged_extend_attention(q, k_buf, v_buf, PagedIndex.build(*lists), scale, out, block_m=block_m, block_n=block_n)
            what = (f"H={num_heads} Hkv={num_kv_heads} D={head_dim} blocks={block_m},{block_n} "
                    f"extend_lens={lists[0]} seq_lens={lists[1]}")
            torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5, msg=what)


def check_mixed() -> None:
    """The reference's signature end to end: paged_attention(q, k_buf, v_buf, AttentionMetadata, scale)."""
    import torch

    from sgl.kernels.attention import AttentionMetadata, paged_attention as ref
    from sgl.kernels.triton_attention import paged_attention as tri

    rng = random.Random(3)
    for (num_heads, num_kv_heads, head_dim), dtype in zip(SHAPES * 2, [torch.float32] * 4 + [torch.float16] * 4):
        for _ in range(2):
            q, k_buf, v_buf, meta, lists = _attention_case(rng, num_heads, num_kv_heads, head_dim, "mixed", 70, dtype)
            scale = head_dim**-0.5
            want = ref(q.float(), k_buf.float(), v_buf.float(), meta, scale)
            got = tri(q, k_buf, v_buf, meta, scale)
            assert got.dtype == dtype and got.shape == want.shape
            tol = 1e-5 if dtype == torch.float32 else 5e-3
            what = f"H={num_heads} Hkv={num_kv_heads} D={head_dim} {dtype} extend_lens={lists[0]} seq_lens={lists[1]}"
            torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol, msg=what)
    # a single contiguous-slot sequence (the reference's view fast path) and a one-token prefill
    for ext, seq, table in [([1], [9], [list(range(3, 12))]), ([5], [5], [list(range(5))]), ([1], [1], [[4]])]:
        k_buf, v_buf = torch.randn(20, 2, 32), torch.randn(20, 2, 32)
        meta = AttentionMetadata.build(ext, seq, table)
        q = torch.randn(sum(ext), 4, 32)
        torch.testing.assert_close(tri(q, k_buf, v_buf, meta, 0.2), ref(q, k_buf, v_buf, meta, 0.2), rtol=1e-5, atol=1e-5)


CHECKS: dict[str, Callable[[], None]] = {
    "store": check_store, "bitmask": check_bitmask, "decode": check_decode, "extend": check_extend, "mixed": check_mixed,
}


# ----------------------------------------------------------------------------- AOT compile for sm_80

def compile_all() -> dict:
    """Compile every kernel for sm_80 from its source (no GPU). Returns {name: shared memory bytes}."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from sgl.kernels import triton_attention as ta
    from sgl.kernels import triton_bitmask as tb
    from sgl.kernels import triton_kv_store as ts

    target = GPUTarget("cuda", 80, 32)

    def build(fn, ptrs: dict, consts: dict):
        # pointers as given; index tensors int64; everything else (strides, lengths) i32
        sig = {n: "constexpr" if n in consts else ptrs.get(n, "*i64" if n.endswith("_ptr") else "i32")
               for n in fn.arg_names}
        if "scale_log2" in sig:
            sig["scale_log2"] = "fp32"
        return triton.compile(ASTSource(fn, sig, constexprs=consts), target=target).metadata.shared

    shared = {}
    for dt in ("fp16", "bf16", "fp32"):
        io = {n: f"*{dt}" for n in ("q_ptr", "k_ptr", "v_ptr", "o_ptr")}
        io.update(mid_o_ptr="*fp32", mid_lse_ptr="*fp32")
        block = 32 if dt == "fp32" else 64  # the launchers' defaults (_default_block)
        if dt != "fp32":  # fp32 decode/merge differ only in pointer types; the extend tile is the risk
            for group, head_dim, splits in [(4, 128, 4), (3, 80, 1)]:
                shared[f"decode {dt} G={group} D={head_dim} splits={splits}"] = build(ta._decode_kernel, io, dict(
                    GROUP=group, HEAD_DIM=head_dim, BLOCK_G=16, BLOCK_D=triton.next_power_of_2(head_dim),
                    BLOCK_N=block, NUM_SPLITS=splits))
            shared[f"merge {dt}"] = build(ta._decode_merge_kernel, io, dict(HEAD_DIM=128, BLOCK_D=128, NUM_SPLITS=4, BLOCK_S=4))
        shared[f"extend {dt} D=128"] = build(ta._extend_kernel, io, dict(
            GROUP=4, HEAD_DIM=128, BLOCK_M=block, BLOCK_N=block, BLOCK_D=128))
        shared[f"bitmask {dt}"] = build(tb._apply_token_bitmask_kernel, {"logits_ptr": f"*{dt}", "bitmask_ptr": "*i32"},
                                        dict(HAS_ROWS=True, BLOCK=1024))
        shared[f"store fp32->{dt}"] = build(ts._store_kvcache_kernel, {
            "k_ptr": "*fp32", "v_ptr": "*fp32", "k_pool_ptr": f"*{dt}", "v_pool_ptr": f"*{dt}"}, dict(ROW=640, BLOCK=1024))
    return shared


# ----------------------------------------------------------------------------- the pytest side

def _run_child(mode: str, env: dict, timeout: float) -> dict:
    proc = subprocess.run([sys.executable, __file__, mode], env={**os.environ, **CHILD_ENV, **env},
                          capture_output=True, text=True, timeout=timeout)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"child failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return json.loads(lines[-1][len("RESULT "):])


@pytest.fixture(scope="module")
def interpreted() -> dict:
    return _run_child("interpret", {"TRITON_INTERPRET": "1"}, timeout=240)


@needs_triton
@pytest.mark.parametrize("name", list(CHECKS))
def test_kernel_matches_reference_under_interpreter(interpreted: dict, name: str) -> None:
    assert interpreted[name] == "ok", interpreted[name]


@needs_triton
def test_kernels_compile_for_sm80() -> None:
    shared = _run_child("compile", {"TRITON_INTERPRET": "0"}, timeout=280)
    assert "error" not in shared, shared.get("error")
    # sm_86/89 give a block 99 KB of shared memory (sm_80: 163 KB)
    assert all(v <= 99 * 1024 for v in shared.values()), shared


def test_dispatch_uses_references_on_cpu() -> None:
    import torch

    from sgl.kernels import attention, dispatch
    from sgl.kernels.attention import AttentionMetadata

    assert not dispatch.use_triton(torch.zeros(1))
    meta = AttentionMetadata.build([2, 1], [2, 3], [[0, 1], [5, 6, 7]])
    q, k, v = torch.randn(3, 2, 16), torch.randn(8, 1, 16), torch.randn(8, 1, 16)
    assert torch.equal(dispatch.paged_attention(q, k, v, meta, 0.3), attention.paged_attention(q, k, v, meta, 0.3))
    kp, vp = torch.zeros(8, 1, 16, dtype=torch.float16), torch.zeros(8, 1, 16, dtype=torch.float16)
    dispatch.store_kvcache(kp, vp, torch.tensor([6, 2]), k[:2], v[:2])
    assert torch.equal(kp[6], k[0].half()) and torch.equal(vp[2], v[1].half())


def test_kernels_import_without_triton() -> None:
    code = (
        "import sys; sys.modules['triton'] = None\n"  # makes `import triton` raise ImportError
        "import torch, sgl.kernels, sgl.kernels.dispatch as d\n"
        "assert not d.triton_available()\n"
        "x = torch.zeros(1, 4); d.apply_token_bitmask_(x, torch.tensor([[2]], dtype=torch.int32))\n"
        "assert x.isfinite().tolist() == [[False, True, False, False]]\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, **CHILD_ENV}, timeout=120)


def _child(mode: str) -> None:
    if mode == "interpret":
        assert os.environ.get("TRITON_INTERPRET") == "1", "run the interpreter checks with TRITON_INTERPRET=1"
        results: dict = {}
        for name, check in CHECKS.items():
            try:
                check()
                results[name] = "ok"
            except Exception:
                results[name] = traceback.format_exc()
    else:
        try:
            results = compile_all()
        except Exception:
            results = {"error": traceback.format_exc()}
    print("RESULT " + json.dumps(results), flush=True)


if __name__ == "__main__":
    _child(sys.argv[1])

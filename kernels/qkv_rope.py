"""Decode's QKV projection with the rotary embedding and the KV-cache write in its epilogue (Triton).

    q = qkv_rope_cache(x, W_qkv, b_qkv, cos, sin, slots, k_cache, v_cache, heads, kv_heads, head_dim)

The same as kernels/gemv.py's GEMV (y = x W^T + b, rounded to bf16) followed by kernels/rope_cache.py
(rotate q and k in float32, write the rotated k and v at each token's cache slot), bit for bit, in one
launch: a batch-1 step's rotary kernel was a launch a layer around a few KB. gpt-oss's rotary pairs
element j of a head with element j + head_dim/2, so each program takes exactly those two weight rows
(they need not be adjacent: every row is its own K-long stream) and has both values of its pair in
hand after the dot products. Program p: head p // (head_dim/2), pair j = p % (head_dim/2); the head is
a q head, a k head or a v head by its place in W_qkv's rows (q, then k, then v).
"""

from __future__ import annotations

import os

import torch

from kernels.gemv import MAX_ROWS, pick_config
from kernels.pdl import pdl_enabled

try:  # optional: importing this module must work where Triton is absent
    import triton
    import triton.language as tl

    from kernels.gemv import weight_row_products
except ImportError:  # pragma: no cover - exercised only without triton
    triton = tl = None

_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def qkv_rope_enabled() -> bool:
    """Whether decode steps use the fused projection (ROSE_FUSED_QKV_ROPE=0: the GEMV, then rope_cache)."""
    return os.environ.get("ROSE_FUSED_QKV_ROPE", "1") != "0"


def qkv_rope_fits(rows: int, weight: torch.Tensor, head_dim: int) -> bool:
    """Whether the fused kernel takes this projection: where kernels/gemv.py's GEMV beats cuBLAS on it."""
    n, k = weight.shape
    return 1 <= rows <= MAX_ROWS and head_dim % 2 == 0 and n % head_dim == 0 and pick_config(rows, n, k) is not None


def qkv_rope_cache(x, weight, bias, cos, sin, slots, k_cache, v_cache, heads: int, kv_heads: int,
                   head_dim: int) -> torch.Tensor:
    """x [T, K] bf16, weight [(heads + 2 kv_heads) * D, K] bf16, bias [N] bf16, cos/sin [T, D/2] float32, slots [T]
    int64 (block * block_size + offset), k_cache/v_cache [blocks, block_size, kv_heads, D] -> q [T, heads, D]."""
    if triton is None:
        raise ImportError("qkv_rope_cache needs Triton: pip install triton (it ships with CUDA torch)")
    t, k = x.shape
    n = weight.shape[0]
    if n != (heads + 2 * kv_heads) * head_dim or weight.shape[1] != k or tuple(bias.shape) != (n,):
        raise ValueError(f"weight [{(heads + 2 * kv_heads) * head_dim}, {k}] and bias [N] expected, got "
                         f"{tuple(weight.shape)} and {tuple(bias.shape)}")
    if not qkv_rope_fits(t, weight, head_dim):
        raise ValueError(f"the fused QKV projection takes 1..{MAX_ROWS} rows where the GEMV is used, got {t}")
    for name, a in (("x", x), ("weight", weight), ("bias", bias)):
        if a.dtype != torch.bfloat16 or not a.is_contiguous():
            raise ValueError(f"{name} must be contiguous bf16")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("the KV cache blocks must be contiguous")
    if not x.is_cuda and not _INTERPRETED:
        raise RuntimeError("qkv_rope_cache on CPU tensors runs only under Triton's interpreter (TRITON_INTERPRET=1)")
    q = torch.empty(t, heads, head_dim, dtype=x.dtype, device=x.device)
    config = pick_config(t, n, k)
    pdl = x.is_cuda and pdl_enabled()
    _qkv_rope_kernel[(n // 2,)](
        x, weight, bias, cos.contiguous(), sin.contiguous(), slots, q, k_cache, v_cache,
        K=k, M=t, BK=config.block_k, HEADS=heads, KV_HEADS=kv_heads, HALF=head_dim // 2,
        EVEN_K=k % config.block_k == 0, PDL=pdl, num_warps=config.num_warps, num_stages=1, launch_pdl=pdl,
    )
    return q


if triton is not None:

    @triton.jit
    def _pair_out(acc, bias, m: tl.constexpr, head, j, rows, sign, cos_ptr, sin_ptr, slots_ptr, q_ptr, k_ptr,
                  v_ptr, HEADS: tl.constexpr, KV_HEADS: tl.constexpr, HALF: tl.constexpr):
        """Token m's pair: y = bf16(acc's row sums + bias), then q or k rotated, or v as is, to its place."""
        D: tl.constexpr = 2 * HALF
        y = (tl.sum(acc, axis=1) + bias).to(tl.bfloat16).to(tl.float32)  # [2]: elements j and j + HALF
        if head < HEADS + KV_HEADS:  # q or k: (a, b) -> (a cos - b sin, b cos + a sin)
            c = tl.load(cos_ptr + m * HALF + j)
            s = tl.load(sin_ptr + m * HALF + j)
            a = tl.sum(tl.where(sign < 0, y, 0.0), axis=0)  # sums of one value and a zero: exact
            b = tl.sum(tl.where(sign > 0, y, 0.0), axis=0)
            y = y * c + sign * tl.where(sign < 0, b, a) * s
        if head < HEADS:
            tl.store(q_ptr + m * HEADS * D + rows, y.to(q_ptr.dtype.element_ty))
        else:
            slot = tl.load(slots_ptr + m).to(tl.int64)
            if head < HEADS + KV_HEADS:
                tl.store(k_ptr + slot * KV_HEADS * D + rows - HEADS * D, y.to(k_ptr.dtype.element_ty))
            else:
                tl.store(v_ptr + slot * KV_HEADS * D + rows - (HEADS + KV_HEADS) * D, y.to(v_ptr.dtype.element_ty))

    @triton.jit
    def _qkv_rope_kernel(x_ptr, w_ptr, b_ptr, cos_ptr, sin_ptr, slots_ptr, q_ptr, k_ptr, v_ptr, K: tl.constexpr,
                         M: tl.constexpr, BK: tl.constexpr, HEADS: tl.constexpr, KV_HEADS: tl.constexpr,
                         HALF: tl.constexpr, EVEN_K: tl.constexpr, PDL: tl.constexpr):
        pid = tl.program_id(0)
        head = pid // HALF
        j = pid % HALF
        pair = tl.arange(0, 2)
        rows = head * 2 * HALF + j + pair * HALF  # the pair's two weight rows (and qkv columns)
        sign = (2 * pair - 1).to(tl.float32)  # -1 for the first element's b sin, +1 for the second's a sin
        w_tile = w_ptr + rows[:, None].to(tl.int64) * K + tl.arange(0, BK)[None, :]
        bias = tl.load(b_ptr + rows).to(tl.float32)  # in flight with the first weight step, before the wait
        acc0, acc1, acc2, acc3 = weight_row_products(x_ptr, w_tile, K, M, 2, BK, EVEN_K, PDL)
        _pair_out(acc0, bias, 0, head, j, rows, sign, cos_ptr, sin_ptr, slots_ptr, q_ptr, k_ptr, v_ptr, HEADS,
                  KV_HEADS, HALF)
        if M > 1:
            _pair_out(acc1, bias, 1, head, j, rows, sign, cos_ptr, sin_ptr, slots_ptr, q_ptr, k_ptr, v_ptr, HEADS,
                      KV_HEADS, HALF)
        if M > 2:
            _pair_out(acc2, bias, 2, head, j, rows, sign, cos_ptr, sin_ptr, slots_ptr, q_ptr, k_ptr, v_ptr, HEADS,
                      KV_HEADS, HALF)
        if M > 3:
            _pair_out(acc3, bias, 3, head, j, rows, sign, cos_ptr, sin_ptr, slots_ptr, q_ptr, k_ptr, v_ptr, HEADS,
                      KV_HEADS, HALF)

"""Rotary embedding of q and k fused with the paged KV-cache write (Triton).

    q = rope_and_cache(qkv, cos, sin, slots, k_cache, v_cache, heads, kv_heads, head_dim)

qkv [T, (heads + 2 kv_heads) * head_dim] bf16 is the QKV projection's output (q, then
k, then v). Per token t: q and k heads are rotated in float32 (gpt-oss's rotary: the
first and second halves of a head are the pair, `apply_rotary` in
services/worker/model/rope.py) and rounded to bf16; the rotated k and the raw v go to
cache slot slots[t] (block * block_size + offset; k_cache/v_cache
[blocks, block_size, kv_heads, head_dim]); the rotated q is returned [T, heads, head_dim].

Eagerly this is some twenty small torch kernels a layer (casts, halves, products,
concatenation, two index writes); in a batch-1 decode step their launch floors cost
more than the attention itself. One program per token does it in one pass.
"""

from __future__ import annotations

import torch

from kernels.pdl import pdl_enabled
from services.worker.model.rope import apply_rotary

try:  # optional: importing this module must work where Triton is absent (CPU CI, macOS)
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only without triton
    triton = tl = None


def rope_and_cache_reference(qkv, cos, sin, slots, k_cache, v_cache, heads: int, kv_heads: int,
                             head_dim: int) -> torch.Tensor:
    """Plain torch, as the model's attention does it: returns q [T, heads, head_dim] in qkv's dtype."""
    t = qkv.shape[0]
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    q = apply_rotary(q.reshape(t, heads, head_dim), cos, sin)
    k = apply_rotary(k.reshape(t, kv_heads, head_dim), cos, sin)
    k_cache.view(-1, kv_heads, head_dim)[slots] = k.to(k_cache.dtype)
    v_cache.view(-1, kv_heads, head_dim)[slots] = v.reshape(t, kv_heads, head_dim).to(v_cache.dtype)
    return q.to(qkv.dtype)


def rope_and_cache(qkv, cos, sin, slots, k_cache, v_cache, heads: int, kv_heads: int, head_dim: int,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """The fused kernel (see the module docstring). cos/sin [T, head_dim/2] float32, slots [T] int64."""
    if triton is None:
        raise ImportError("kernels.rope_cache needs triton (it ships with torch's CUDA builds)")
    t = qkv.shape[0]
    if qkv.stride(-1) != 1 or qkv.shape[1] != (heads + 2 * kv_heads) * head_dim:
        raise ValueError(f"qkv must be [T, {(heads + 2 * kv_heads) * head_dim}] with unit column stride")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("the KV cache blocks must be contiguous")
    out = torch.empty(t, heads, head_dim, dtype=qkv.dtype, device=qkv.device) if out is None else out
    if t:
        half = head_dim // 2
        pdl = qkv.is_cuda and pdl_enabled()
        _rope_cache_kernel[(t,)](
            qkv, cos.contiguous(), sin.contiguous(), slots, out, k_cache, v_cache, qkv.stride(0),
            HEADS=heads, KV_HEADS=kv_heads, HALF=half,
            HEADS_P2=triton.next_power_of_2(heads), KV_P2=triton.next_power_of_2(kv_heads),
            HALF_P2=triton.next_power_of_2(half), PDL=pdl, num_warps=4, launch_pdl=pdl,
        )
    return out


if triton is not None:

    @triton.jit
    def _rotate(src, cos, sin, dst, rows, cols, n_rows, HALF: tl.constexpr, row_stride):
        """dst[r, :] = rotary(src[r, :]) for a [rows, HALF] tile of head halves."""
        mask = (rows[:, None] < n_rows) & (cols[None, :] < HALF)
        first_at = rows[:, None] * row_stride + cols[None, :]
        first = tl.load(src + first_at, mask=mask, other=0.0).to(tl.float32)
        second = tl.load(src + first_at + HALF, mask=mask, other=0.0).to(tl.float32)
        tl.store(dst + first_at, (first * cos - second * sin).to(dst.dtype.element_ty), mask=mask)
        tl.store(dst + first_at + HALF, (second * cos + first * sin).to(dst.dtype.element_ty), mask=mask)

    @triton.jit
    def _rope_cache_kernel(qkv, cos_ptr, sin_ptr, slots, q_out, k_cache, v_cache, qkv_stride,
                           HEADS: tl.constexpr, KV_HEADS: tl.constexpr, HALF: tl.constexpr,
                           HEADS_P2: tl.constexpr, KV_P2: tl.constexpr, HALF_P2: tl.constexpr, PDL: tl.constexpr):
        if PDL:  # everything it reads was written by the kernels before (kernels/pdl.py)
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        t = tl.program_id(0).to(tl.int64)
        D: tl.constexpr = 2 * HALF
        cols = tl.arange(0, HALF_P2)
        cos = tl.load(cos_ptr + t * HALF + cols, mask=cols < HALF, other=0.0)[None, :]
        sin = tl.load(sin_ptr + t * HALF + cols, mask=cols < HALF, other=0.0)[None, :]
        row = qkv + t * qkv_stride
        _rotate(row, cos, sin, q_out + t * HEADS * D, tl.arange(0, HEADS_P2), cols, HEADS, HALF, D)
        slot = tl.load(slots + t).to(tl.int64)
        kv_rows = tl.arange(0, KV_P2)
        _rotate(row + HEADS * D, cos, sin, k_cache + slot * KV_HEADS * D, kv_rows, cols, KV_HEADS, HALF, D)
        # v: copied as is, both halves
        mask = (kv_rows[:, None] < KV_HEADS) & (cols[None, :] < HALF)
        at = kv_rows[:, None] * D + cols[None, :]
        v_src = row + (HEADS + KV_HEADS) * D
        v_dst = v_cache + slot * KV_HEADS * D
        tl.store(v_dst + at, tl.load(v_src + at, mask=mask).to(v_cache.dtype.element_ty), mask=mask)
        tl.store(v_dst + at + HALF, tl.load(v_src + at + HALF, mask=mask).to(v_cache.dtype.element_ty), mask=mask)

"""Router top-k with a softmax over the chosen k (gpt-oss's MoE routing).

    ids[t] = the k largest of logits[t] (ties: lowest expert first), in descending order
    weights[t] = softmax(logits[t, ids[t]])

One warp per token (`warp_topk`, which kernels/moe_dispatch.py's route_topk shares): lane l
holds experts l, l+32, ...; each of the k rounds is a lane-local argmax and a 5-step
butterfly (value, index) reduction, so every lane ends with the winner. The router's matrix
product (hidden -> experts) is kernels/gemv.py's GEMV or cuBLAS.
"""

import functools  # no `from __future__ import annotations`: CuTeDSL evaluates annotations

import torch

from kernels._cute import cute_modules, launch, pdl_wait, rows
from kernels.pdl import pdl_enabled

ROWS_PER_CTA = 4


def router_reference(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain torch. logits: [T, E] -> (ids [T, k] int32, weights [T, k] float32)."""
    values, ids = torch.topk(logits.float(), k, dim=-1, sorted=True)
    return ids.to(torch.int32), torch.softmax(values, dim=-1)


@functools.cache
def warp_topk(num_experts: int, k: int):
    """A @cute.jit function (mL, row, lane, ids, weights): one warp's top-k + softmax of row `row` of mL [T, E].

    ids (int32) and weights (float32) are rmem tensors [k], filled in every lane. Lane l holds
    experts l, l+32, ...; each of the k rounds is a lane-local argmax and a 5-step butterfly
    (value, index) reduction, so every lane ends with the winner.
    """
    cutlass, cute, _, _ = cute_modules()
    Float32 = cutlass.Float32
    per_lane = (num_experts + 31) // 32
    neg_inf = float("-inf")

    @cute.jit
    def topk(mL: cute.Tensor, row: cutlass.Int32, lane: cutlass.Int32, top_i: cute.Tensor, top_v: cute.Tensor):
        vals = cute.make_rmem_tensor((per_lane,), Float32)
        for j in cutlass.range_constexpr(per_lane):
            vals[j] = Float32(neg_inf)
            e = lane + 32 * j
            if e < num_experts:
                vals[j] = mL[row, e].to(Float32)
        for r in cutlass.range_constexpr(k):
            bv = vals[0]
            bi = lane
            for j in cutlass.range_constexpr(1, per_lane):
                if vals[j] > bv:
                    bv = vals[j]
                    bi = lane + 32 * j
            for s in cutlass.range_constexpr(5):
                ov = cute.arch.shuffle_sync_bfly(bv, offset=16 >> s)
                oi = cute.arch.shuffle_sync_bfly(bi, offset=16 >> s)
                if ov > bv or (ov == bv and oi < bi):
                    bv = ov
                    bi = oi
            top_v[r] = bv
            top_i[r] = bi
            for j in cutlass.range_constexpr(per_lane):
                if lane + 32 * j == bi:
                    vals[j] = Float32(neg_inf)
        total = Float32(0.0)
        top = top_v[0]  # the largest: exp never overflows
        for r in cutlass.range_constexpr(k):
            top_v[r] = cute.math.exp(top_v[r] - top, fastmath=True)
            total = total + top_v[r]
        for r in cutlass.range_constexpr(k):
            top_v[r] = top_v[r] / total

    return topk


@functools.cache
def _launcher(num_experts: int, k: int, dtype: torch.dtype):
    cutlass, cute, _, cuda = cute_modules()
    topk = warp_topk(num_experts, k)

    @cute.kernel
    def kernel(mL: cute.Tensor, mI: cute.Tensor, mW: cute.Tensor):
        pdl_wait()
        tidx, _, _ = cute.arch.thread_idx()
        bidx, _, _ = cute.arch.block_idx()
        lane = tidx % 32
        row = bidx * ROWS_PER_CTA + tidx // 32
        if row < mL.shape[0]:
            top_i = cute.make_rmem_tensor((k,), cutlass.Int32)
            top_w = cute.make_rmem_tensor((k,), cutlass.Float32)
            topk(mL, row, lane, top_i, top_w)
            if lane == 0:
                for r in cutlass.range_constexpr(k):
                    mI[row, r] = top_i[r]
                    mW[row, r] = top_w[r]

    @cute.jit
    def launch(mL: cute.Tensor, mI: cute.Tensor, mW: cute.Tensor, stream: cuda.CUstream):
        rows = mL.shape[0]
        kernel(mL, mI, mW).launch(
            grid=[(rows + ROWS_PER_CTA - 1) // ROWS_PER_CTA, 1, 1], block=[32 * ROWS_PER_CTA, 1, 1], stream=stream,
            use_pdl=pdl_enabled(),
        )

    return launch


def router_topk(
    logits: torch.Tensor, k: int, out: tuple[torch.Tensor, torch.Tensor] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """CuTeDSL top-k + softmax. logits: [T, E] contiguous -> (ids [T, k] int32, weights [T, k] float32)."""
    n, num_experts = logits.shape
    if not logits.is_contiguous():
        raise ValueError("logits must be contiguous")
    if k > num_experts:
        raise ValueError(f"k={k} > {num_experts} experts")
    if out is None:
        out = (torch.empty(n, k, dtype=torch.int32, device=logits.device),
               torch.empty(n, k, dtype=torch.float32, device=logits.device))
    ids, weights = out
    if n:
        key = ("router", num_experts, k, logits.dtype)
        launch(key, _launcher(*key[1:]), rows(logits, logits.element_size()), rows(ids, 4), rows(weights, 4))
    return ids, weights

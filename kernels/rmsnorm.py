"""RMSNorm over the hidden dim, optionally fused with the residual add before it.

    h = x + residual            (when a residual is given; h is also returned)
    y = h * rsqrt(mean(h^2) + eps) * weight

One warp per row: each lane holds ceil(hidden / 256) 16-byte vectors of the row in
registers, so the row is read once, the sum of squares is a warp shuffle reduction and
no shared memory is used. bf16 in/out, float32 arithmetic.
"""


import functools  # no `from __future__ import annotations`: CuTeDSL evaluates annotations

import torch

from kernels._cute import VEC, as_cute, as_rows, check_rows, compiled, cute_modules, current_stream

ROWS_PER_CTA = 4  # 4 warps: 128 threads a CTA


def rmsnorm_reference(
    x: torch.Tensor, weight: torch.Tensor | None, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Plain torch: (y, h). x, residual: [T, H]; weight: [H]; y, h in x's dtype; h is None without residual."""
    h = x.float() if residual is None else x.float() + residual.float()
    y = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.float()
    return y.to(x.dtype), (None if residual is None else h.to(x.dtype))


@functools.cache
def _launcher(hidden: int, dtype: torch.dtype, w_dtype: torch.dtype | None, fused_residual: bool):
    """The jit launcher for one (hidden, dtype, weight dtype, residual) specialization."""
    cutlass, cute, _, cuda = cute_modules()
    Float32, Int32 = cutlass.Float32, cutlass.Int32
    nvec = hidden // VEC
    per_lane = (nvec + 31) // 32
    has_weight = w_dtype is not None
    out_t = {torch.bfloat16: cutlass.BFloat16, torch.float16: cutlass.Float16, torch.float32: cutlass.Float32}[dtype]

    @cute.kernel
    def kernel(mX: cute.Tensor, mR: cute.Tensor, mW: cute.Tensor, mY: cute.Tensor, mH: cute.Tensor, eps: Float32):
        tidx, _, _ = cute.arch.thread_idx()
        bidx, _, _ = cute.arch.block_idx()
        lane = tidx % 32
        row = bidx * ROWS_PER_CTA + tidx // 32
        if row < mX.shape[0]:
            # Loads are unconditional (the tail lane re-reads the last vector) so all of a
            # lane's vectors are in flight at once; only the tail's use and store are guarded.
            vals = cute.make_rmem_tensor((per_lane, VEC), Float32)
            sumsq = Float32(0.0)
            for j in cutlass.range_constexpr(per_lane):
                v = lane + 32 * j
                if cutlass.const_expr(32 * (j + 1) > nvec):
                    v = cutlass.min(v, nvec - 1)
                h = mX[row, v, None].load().to(Float32)
                if cutlass.const_expr(fused_residual):
                    h = h + mR[row, v, None].load().to(Float32)
                vals[j, None].store(h)
            for j in cutlass.range_constexpr(per_lane):
                h = vals[j, None].load()
                part = (h * h).reduce(cute.ReductionOp.ADD, Float32(0.0), 0)
                if cutlass.const_expr(32 * (j + 1) > nvec):
                    if lane + 32 * j < nvec:
                        sumsq = sumsq + part
                        if cutlass.const_expr(fused_residual):
                            mH[row, lane + 32 * j, None].store(h.to(out_t))
                else:
                    sumsq = sumsq + part
                    if cutlass.const_expr(fused_residual):
                        mH[row, lane + 32 * j, None].store(h.to(out_t))
            sumsq = cute.arch.warp_reduction_sum(sumsq)
            rstd = cute.math.rsqrt(sumsq / Float32(hidden) + eps, fastmath=True)
            for j in cutlass.range_constexpr(per_lane):
                v = lane + 32 * j
                if cutlass.const_expr(32 * (j + 1) > nvec):
                    v = cutlass.min(v, nvec - 1)
                y = vals[j, None].load() * rstd
                if cutlass.const_expr(has_weight):
                    y = y * mW[v, None].load().to(Float32)
                if cutlass.const_expr(32 * (j + 1) > nvec):
                    if lane + 32 * j < nvec:
                        mY[row, v, None].store(y.to(out_t))
                else:
                    mY[row, v, None].store(y.to(out_t))

    @cute.jit
    def launch(mX: cute.Tensor, mR: cute.Tensor, mW: cute.Tensor, mY: cute.Tensor, mH: cute.Tensor,
               eps: Float32, stream: cuda.CUstream):
        rows = mX.shape[0]
        kernel(mX, mR, mW, mY, mH, eps).launch(
            grid=[(rows + ROWS_PER_CTA - 1) // ROWS_PER_CTA, 1, 1], block=[32 * ROWS_PER_CTA, 1, 1], stream=stream
        )

    return launch


def rmsnorm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    eps: float,
    residual: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """CuTeDSL RMSNorm: (y, h) as `rmsnorm_reference`. x, residual, out: [T, H] contiguous; weight: [H]."""
    hidden = x.shape[-1]
    x2 = x.reshape(-1, hidden)
    check_rows(x2, hidden, "x")
    rows = x2.shape[0]
    y = torch.empty_like(x2) if out is None else out.view(-1, hidden)
    h = torch.empty_like(x2) if residual is not None else None
    if rows:
        cutlass = cute_modules()[0]
        key = ("rmsnorm", hidden, x.dtype, None if weight is None else weight.dtype, residual is not None)
        vx = as_rows(x2.view(rows, -1, VEC))
        vr = as_rows(residual.reshape(rows, -1, VEC)) if residual is not None else vx
        vh = as_rows(h.view(rows, -1, VEC)) if h is not None else vx
        vw = as_cute(weight.view(-1, VEC)) if weight is not None else as_cute(x2[0].view(-1, VEC))
        args = (vx, vr, vw, as_rows(y.view(rows, -1, VEC)), vh, cutlass.Float32(eps), current_stream())
        compiled(key, _launcher(*key[1:]), *args)(*args)
    shape = x.shape
    return y.view(shape), (None if h is None else h.view(shape))

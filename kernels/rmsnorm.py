"""RMSNorm over the hidden dim, optionally fused with the residual add before it.

    h = x + residual            (when a residual is given; h is also returned)
    y = h * rsqrt(mean(h^2) + eps) * weight

One warp per row (or per 2 rows sharing one load of the weights): each lane holds
ceil(hidden / 256) 16-byte vectors of the row in registers, so the row is read once,
the sum of squares is a warp shuffle reduction and no shared memory is used. bf16
in/out, float32 arithmetic; h is rounded to the activation dtype before the norm, as
the torch model's bf16 residual stream is.
"""

import functools  # no `from __future__ import annotations`: CuTeDSL evaluates annotations

import torch

from kernels._cute import VEC, check_rows, cute_modules, fixed, launch, rows

WARPS_PER_CTA = 4  # 128 threads a CTA
# Rows a warp normalizes with one load of the weights: 2 pays off only without a residual
# and with rows enough to fill the GPU (bench/rmsnorm_rows.py: 83% -> 90% of the copy
# bandwidth at 4096 rows; slower at 1 and 64 rows and with a residual).
ROWS_PER_WARP_MIN_ROWS = 1024


def rmsnorm_reference(
    x: torch.Tensor, weight: torch.Tensor | None, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Plain torch: (y, h). x, residual: [T, H]; weight: [H]; y, h in x's dtype; h is None without residual."""
    h = x.float() if residual is None else (x.float() + residual.float()).to(x.dtype).float()
    y = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.float()
    return y.to(x.dtype), (None if residual is None else h.to(x.dtype))


@functools.cache
def _launcher(hidden: int, dtype: torch.dtype, w_dtype: torch.dtype | None, fused_residual: bool,
              rows_per_warp: int):
    """The jit launcher for one (hidden, dtype, weight dtype, residual) specialization."""
    cutlass, cute, _, cuda = cute_modules()
    Float32 = cutlass.Float32
    nvec = hidden // VEC
    per_lane = (nvec + 31) // 32
    has_weight = w_dtype is not None
    out_t = {torch.bfloat16: cutlass.BFloat16, torch.float16: cutlass.Float16, torch.float32: cutlass.Float32}[dtype]

    w_t = {None: out_t, torch.bfloat16: cutlass.BFloat16, torch.float16: cutlass.Float16,
           torch.float32: cutlass.Float32}[w_dtype]

    per_cta = WARPS_PER_CTA * rows_per_warp

    def tail(j):  # does chunk j run past the row (compile time)?
        return 32 * (j + 1) > nvec

    @cute.kernel
    def kernel(mX: cute.Tensor, mR: cute.Tensor, mW: cute.Tensor, mY: cute.Tensor, mH: cute.Tensor, eps: Float32):
        tidx, _, _ = cute.arch.thread_idx()
        bidx, _, _ = cute.arch.block_idx()
        lane = tidx % 32
        first = (bidx * WARPS_PER_CTA + tidx // 32) * rows_per_warp
        n = mX.shape[0]
        if first < n:
            # Every load is unconditional (a tail lane re-reads the row's last vector, a
            # tail warp the last row), so all of a warp's rows and weights are in flight at
            # once; only uses are guarded. The weights are loaded once per warp for its
            # rows_per_warp rows. h is kept in the activation dtype: the residual sum is
            # rounded as the torch model rounds it, and half of float32's registers.
            wts = cute.make_rmem_tensor((per_lane, VEC), w_t)
            vals = [cute.make_rmem_tensor((per_lane, VEC), out_t) for _ in range(rows_per_warp)]
            for r in cutlass.range_constexpr(rows_per_warp):
                row = cutlass.min(first + r, n - 1)
                for j in cutlass.range_constexpr(per_lane):
                    v = lane + 32 * j
                    if cutlass.const_expr(tail(j)):
                        v = cutlass.min(v, nvec - 1)
                    if cutlass.const_expr(fused_residual):
                        vals[r][j, None].store(
                            (mX[row, v, None].load().to(Float32) + mR[row, v, None].load().to(Float32)).to(out_t)
                        )
                    else:
                        vals[r][j, None].store(mX[row, v, None].load())
                    if cutlass.const_expr(has_weight and r == 0):
                        wts[j, None].store(mW[v, None].load())
            for r in cutlass.range_constexpr(rows_per_warp):
                row = first + r
                if row < n:
                    sumsq = Float32(0.0)
                    for j in cutlass.range_constexpr(per_lane):
                        h = vals[r][j, None].load().to(Float32)
                        part = (h * h).reduce(cute.ReductionOp.ADD, Float32(0.0), 0)
                        if cutlass.const_expr(tail(j)):
                            if lane + 32 * j < nvec:
                                sumsq = sumsq + part
                                if cutlass.const_expr(fused_residual):
                                    mH[row, lane + 32 * j, None].store(vals[r][j, None].load())
                        else:
                            sumsq = sumsq + part
                            if cutlass.const_expr(fused_residual):
                                mH[row, lane + 32 * j, None].store(vals[r][j, None].load())
                    sumsq = cute.arch.warp_reduction_sum(sumsq)
                    rstd = cute.math.rsqrt(sumsq / Float32(hidden) + eps, fastmath=True)
                    for j in cutlass.range_constexpr(per_lane):
                        y = vals[r][j, None].load().to(Float32) * rstd
                        if cutlass.const_expr(has_weight):
                            y = y * wts[j, None].load().to(Float32)
                        if cutlass.const_expr(tail(j)):
                            if lane + 32 * j < nvec:
                                mY[row, lane + 32 * j, None].store(y.to(out_t))
                        else:
                            mY[row, lane + 32 * j, None].store(y.to(out_t))

    @cute.jit
    def launch(mX: cute.Tensor, mR: cute.Tensor, mW: cute.Tensor, mY: cute.Tensor, mH: cute.Tensor,
               eps: Float32, stream: cuda.CUstream):
        rows = mX.shape[0]
        kernel(mX, mR, mW, mY, mH, eps).launch(
            grid=[(rows + per_cta - 1) // per_cta, 1, 1], block=[32 * WARPS_PER_CTA, 1, 1], stream=stream
        )

    return launch


def rmsnorm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    eps: float,
    residual: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    rows_per_warp: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """CuTeDSL RMSNorm: (y, h) as `rmsnorm_reference`. x, residual, out: [T, H] contiguous; weight: [H]."""
    hidden = x.shape[-1]
    x2 = x.reshape(-1, hidden)
    check_rows(x2, hidden, "x")
    n = x2.shape[0]
    y = torch.empty_like(x2) if out is None else out.view(-1, hidden)
    h = torch.empty_like(x2) if residual is not None else None
    if n:
        cutlass = cute_modules()[0]
        if rows_per_warp is None:
            rows_per_warp = 2 if residual is None and n >= ROWS_PER_WARP_MIN_ROWS else 1
        key = ("rmsnorm", hidden, x.dtype, None if weight is None else weight.dtype, residual is not None,
               rows_per_warp)
        vx = x2.view(n, -1, VEC)
        vr = residual.reshape(n, -1, VEC) if residual is not None else vx
        vh = h.view(n, -1, VEC) if h is not None else vx
        vw = weight.view(-1, VEC) if weight is not None else x2[0].view(-1, VEC)
        launch(key, _launcher(*key[1:]), rows(vx), rows(vr), fixed(vw), rows(y.view(n, -1, VEC)), rows(vh),
               cutlass.Float32(eps))
    shape = x.shape
    return y.view(shape), (None if h is None else h.view(shape))

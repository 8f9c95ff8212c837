"""RMSNorm over the hidden dim, optionally fused with the residual add before it.

    h = x + residual            (when a residual is given; h is also returned)
    y = h * rsqrt(mean(h^2) + eps) * weight

`combine_rmsnorm` also folds in the MoE combine before it (x[t] = sum_j w[t, j] ys[pos[t, j]]):
the end of one layer and the start of the next in one kernel.

One warp per row (or per 2 rows sharing one load of the weights): each lane holds
ceil(hidden / 256) 16-byte vectors of the row in registers, so the row is read once,
the sum of squares is a warp shuffle reduction and no shared memory is used. bf16
in/out, float32 arithmetic; h is rounded to the activation dtype before the norm, as
the torch model's bf16 residual stream is.
"""

import functools  # no `from __future__ import annotations`: CuTeDSL evaluates annotations

import torch

from kernels._cute import VEC, check_rows, cute_modules, fixed, launch, pdl_wait, rows
from kernels.pdl import pdl_enabled

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
              rows_per_warp: int, combine_k: int = 0):
    """The jit launcher for one (hidden, dtype, weight dtype, residual, combine) specialization.

    combine_k > 0: x is the experts' output rows ys [T*k, H] and row t's x is the MoE combine
    sum_j weights[t, j] * ys[pos[t, j]], rounded to x's dtype as kernels/moe_dispatch.py's combine
    stores it (then the residual add and the norm as usual).
    """
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
    def kernel(mX: cute.Tensor, mR: cute.Tensor, mW: cute.Tensor, mY: cute.Tensor, mH: cute.Tensor,
               mPos: cute.Tensor, mCW: cute.Tensor, eps: Float32):
        tidx, _, _ = cute.arch.thread_idx()
        bidx, _, _ = cute.arch.block_idx()
        lane = tidx % 32
        first = (bidx * WARPS_PER_CTA + tidx // 32) * rows_per_warp
        n = mR.shape[0]  # mR is mX itself without a residual; mX has T*k rows with combine
        # The weights are the step's constants: loaded before PDL's wait, while the kernel
        # before this one still runs; once per warp for its rows_per_warp rows.
        wts = cute.make_rmem_tensor((per_lane, VEC), w_t)
        if cutlass.const_expr(has_weight):
            for j in cutlass.range_constexpr(per_lane):
                wv = lane + 32 * j
                if cutlass.const_expr(tail(j)):
                    wv = cutlass.min(wv, nvec - 1)
                wts[j, None].store(mW[wv, None].load())
        pdl_wait()
        if first < n:
            # Every load is unconditional (a tail lane re-reads the row's last vector, a
            # tail warp the last row), so all of a warp's rows are in flight at once; only
            # uses are guarded. h is kept in the activation dtype: the residual sum is
            # rounded as the torch model rounds it, and half of float32's registers.
            vals = [cute.make_rmem_tensor((per_lane, VEC), out_t) for _ in range(rows_per_warp)]
            for r in cutlass.range_constexpr(rows_per_warp):
                row = cutlass.min(first + r, n - 1)
                if cutlass.const_expr(combine_k > 0):
                    src = cute.make_rmem_tensor((combine_k,), cutlass.Int32)
                    wgt = cute.make_rmem_tensor((combine_k,), Float32)
                    for c in cutlass.range_constexpr(combine_k):
                        src[c] = mPos[row, c]
                        wgt[c] = mCW[row, c]
                for j in cutlass.range_constexpr(per_lane):
                    v = lane + 32 * j
                    if cutlass.const_expr(tail(j)):
                        v = cutlass.min(v, nvec - 1)
                    if cutlass.const_expr(combine_k > 0):
                        moe = mX[src[0], v, None].load().to(Float32) * wgt[0]
                        for c in cutlass.range_constexpr(1, combine_k):
                            moe = moe + mX[src[c], v, None].load().to(Float32) * wgt[c]
                        vals[r][j, None].store(
                            (moe.to(out_t).to(Float32) + mR[row, v, None].load().to(Float32)).to(out_t)
                        )
                    elif cutlass.const_expr(fused_residual):
                        vals[r][j, None].store(
                            (mX[row, v, None].load().to(Float32) + mR[row, v, None].load().to(Float32)).to(out_t)
                        )
                    else:
                        vals[r][j, None].store(mX[row, v, None].load())
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
               mPos: cute.Tensor, mCW: cute.Tensor, eps: Float32, stream: cuda.CUstream):
        rows = mR.shape[0]
        kernel(mX, mR, mW, mY, mH, mPos, mCW, eps).launch(
            grid=[(rows + per_cta - 1) // per_cta, 1, 1], block=[32 * WARPS_PER_CTA, 1, 1], stream=stream,
            use_pdl=pdl_enabled(),
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
        pos, cw = _no_combine(x.device)
        launch(key, _launcher(*key[1:]), rows(vx), rows(vr), fixed(vw), rows(y.view(n, -1, VEC)), rows(vh),
               rows(pos, 4), rows(cw, 4), cutlass.Float32(eps))
    shape = x.shape
    return y.view(shape), (None if h is None else h.view(shape))


def combine_rmsnorm_reference(ys: torch.Tensor, pos: torch.Tensor, weights: torch.Tensor, residual: torch.Tensor,
                              weight: torch.Tensor | None, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain torch: the MoE combine (rounded to ys' dtype) into `rmsnorm_reference` with the residual."""
    moe = (ys[pos.long()].float() * weights.float()[..., None]).sum(1).to(ys.dtype)
    return rmsnorm_reference(moe, weight, eps, residual)


def combine_rmsnorm(ys: torch.Tensor, pos: torch.Tensor, weights: torch.Tensor, residual: torch.Tensor,
                    weight: torch.Tensor | None, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The MoE's combine, the residual add and the next RMSNorm in one kernel: (y, h) as the reference.

    ys [T*k, H] the experts' output rows; pos [T, k] int32 each choice's row in ys (the route's
    pos); weights [T, k] float32; residual [T, H]. One kernel where combine then rmsnorm were two,
    and the combined rows never go to memory.
    """
    hidden = ys.shape[-1]
    check_rows(ys, hidden, "ys")
    n, k = weights.shape
    if tuple(residual.shape) != (n, hidden) or not residual.is_contiguous():
        raise ValueError(f"residual must be contiguous [{n}, {hidden}], got {tuple(residual.shape)}")
    if tuple(pos.shape) != (n, k) or pos.dtype != torch.int32 or not pos.is_contiguous():
        raise ValueError(f"pos must be contiguous int32 [{n}, {k}]")
    y = torch.empty_like(residual)
    h = torch.empty_like(residual)
    if n:
        cutlass = cute_modules()[0]
        key = ("rmsnorm", hidden, ys.dtype, None if weight is None else weight.dtype, True, 1, k)
        vw = weight.view(-1, VEC) if weight is not None else residual[0].view(-1, VEC)
        launch(key, _launcher(*key[1:]), rows(ys.view(ys.shape[0], -1, VEC)), rows(residual.view(n, -1, VEC)),
               fixed(vw), rows(y.view(n, -1, VEC)), rows(h.view(n, -1, VEC)), rows(pos, 4),
               rows(weights.float().contiguous(), 4), cutlass.Float32(eps))
    return y, h


@functools.cache
def _no_combine(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Placeholder pos / weights for the kernel's unused combine inputs (never read without combine)."""
    return (torch.zeros(1, 1, dtype=torch.int32, device=device), torch.zeros(1, 1, dtype=torch.float32, device=device))

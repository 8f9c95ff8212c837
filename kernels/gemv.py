"""Dense projection for a few rows (decode), Triton: y = x W^T + b on the CUDA cores.

    x [M, K] bf16, W [N, K] bf16 (nn.Linear's layout), b [N] bf16 or None -> y [M, N] bf16

At batch 1 a decode step's dense projections (QKV, o_proj, the router) are pure weight
streams; cuBLAS ran them at 54-64% of the copy bandwidth (`python -m bench.gemv`, H100),
o_proj and the router through split-K plus a separate reduce kernel. Here each program owns
BN weight rows over the whole of K: it keeps a [BN, BK] float32 partial product per x row in registers, loads
the next K step before multiplying this one (Triton pipelines only loads that feed a dot),
and reduces across K once at the end. No split-K, no second kernel, nothing written but y.
M is a compile-time constant (one specialization per decode batch size it is used for).
"""

from __future__ import annotations

import dataclasses
import os

import torch

from kernels.pdl import pdl_enabled

try:  # optional: importing this module must work where Triton is absent
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only without triton
    triton = tl = None

_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

MAX_ROWS = 4  # the kernel keeps one accumulator per row: four at most


@dataclasses.dataclass(frozen=True)
class GemvConfig:
    """Weight rows per program, K per step, warps."""

    block_n: int = 4
    block_k: int = 512
    num_warps: int = 4


DEFAULT = GemvConfig()


def pick_config(rows: int, n: int, k: int) -> GemvConfig | None:
    """The GEMV's launch shape for rows x [n, k], or None where cuBLAS is faster.

    From `python -m bench.gemv` on an H100 at gpt-oss-20b shapes (903cbb9): at one row the GEMV
    beat cuBLAS 1.20x on QKV (5120 x 2880), 1.39x on o_proj (2880 x 4096, cuBLAS split-K +
    reduce) and 3.28x on the router (32 x 2880); at two rows it still won on o_proj (1.19x) and
    the router, at four only on the router.
    """
    if n <= 64:  # the router: a handful of rows, nothing for cuBLAS to tile
        return GemvConfig(2, 1024, 4) if rows <= 4 else None
    if k >= 4096:
        return GemvConfig(4, 1024, 4) if rows <= 2 else None
    return GemvConfig(2, 512, 2) if rows == 1 else None


def gemv_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Plain torch in float32, rounded to x's dtype. x [M, K], weight [N, K], bias [N] -> [M, N]."""
    y = x.float() @ weight.float().T
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, out: torch.Tensor | None = None,
         config: GemvConfig = DEFAULT) -> torch.Tensor:
    """x W^T + b for M <= MAX_ROWS rows. x [M, K] bf16 contiguous; weight [N, K] bf16 contiguous; bias [N] -> [M, N]."""
    if triton is None:
        raise ImportError("gemv needs Triton: pip install triton (it ships with CUDA torch)")
    m, k = x.shape
    n = weight.shape[0]
    if not 1 <= m <= MAX_ROWS:
        raise ValueError(f"gemv takes 1..{MAX_ROWS} rows, got {m}")
    if x.dtype != torch.bfloat16 or weight.dtype != torch.bfloat16 or not (x.is_contiguous() and weight.is_contiguous()):
        raise ValueError(f"x and weight must be contiguous bf16, got {x.dtype}, {weight.dtype}")
    if weight.shape[1] != k:
        raise ValueError(f"weight must be [N, {k}], got {tuple(weight.shape)}")
    if bias is not None and (tuple(bias.shape) != (n,) or not bias.is_contiguous()):
        raise ValueError(f"bias must be contiguous [{n}], got {tuple(bias.shape)}")
    if not x.is_cuda and not _INTERPRETED:
        raise RuntimeError("gemv on CPU tensors runs only under Triton's interpreter (TRITON_INTERPRET=1)")
    y = torch.empty(m, n, dtype=x.dtype, device=x.device) if out is None else out
    if tuple(y.shape) != (m, n) or y.dtype != x.dtype or not y.is_contiguous():
        raise ValueError(f"out must be contiguous {x.dtype} [{m}, {n}]")
    c = config
    pdl = x.is_cuda and pdl_enabled()
    _gemv_kernel[(triton.cdiv(n, c.block_n),)](
        x, weight, weight if bias is None else bias, y, N=n, K=k, M=m, BN=c.block_n, BK=c.block_k,
        HAS_BIAS=bias is not None, EVEN_K=k % c.block_k == 0, PDL=pdl, num_warps=c.num_warps, num_stages=1,
        launch_pdl=pdl,
    )
    return y


if triton is not None:

    @triton.jit
    def _row_partial(acc, w, x_ptr, m: tl.constexpr, K: tl.constexpr, k_idx, k_in, EVEN_K: tl.constexpr):
        """acc [BN, BK] + w * x[m, k_idx] broadcast over the weight rows."""
        if EVEN_K:
            xm = tl.load(x_ptr + m * K + k_idx)
        else:
            xm = tl.load(x_ptr + m * K + k_idx, mask=k_in, other=0.0)
        return acc + w * xm.to(tl.float32)[None, :]

    @triton.jit
    def weight_row_products(x_ptr, w_tile, K: tl.constexpr, M: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                            EVEN_K: tl.constexpr, PDL: tl.constexpr):
        """The main loop: per x row m < M, a [BN, BK] float32 tile of partial products whose row sums are
        x[m] . W[row] (rows past M stay zero). w_tile: the BN weight rows' pointers at K offsets [0, BK).

        Loads the first weight step, then (with PDL) waits for the kernels before: x is theirs, the weights
        are not (kernels/pdl.py)."""
        k = tl.arange(0, BK)
        acc0 = tl.zeros((BN, BK), dtype=tl.float32)
        acc1 = tl.zeros((BN, BK), dtype=tl.float32)
        acc2 = tl.zeros((BN, BK), dtype=tl.float32)
        acc3 = tl.zeros((BN, BK), dtype=tl.float32)
        if EVEN_K:
            w_next = tl.load(w_tile)
        else:
            w_next = tl.load(w_tile, mask=(k < K)[None, :], other=0.0)
        if PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        for k0 in range(0, K, BK):
            w = w_next.to(tl.float32)
            k_idx = k0 + k
            k_in = k_idx < K
            w_tile += BK
            if EVEN_K:
                if k0 + BK < K:
                    w_next = tl.load(w_tile)
            else:
                w_next = tl.load(w_tile, mask=(k_idx + BK < K)[None, :], other=0.0)
            acc0 = _row_partial(acc0, w, x_ptr, 0, K, k_idx, k_in, EVEN_K)
            if M > 1:
                acc1 = _row_partial(acc1, w, x_ptr, 1, K, k_idx, k_in, EVEN_K)
            if M > 2:
                acc2 = _row_partial(acc2, w, x_ptr, 2, K, k_idx, k_in, EVEN_K)
            if M > 3:
                acc3 = _row_partial(acc3, w, x_ptr, 3, K, k_idx, k_in, EVEN_K)
        return acc0, acc1, acc2, acc3

    @triton.jit
    def _gemv_kernel(x_ptr, w_ptr, b_ptr, y_ptr, N: tl.constexpr, K: tl.constexpr, M: tl.constexpr,
                     BN: tl.constexpr, BK: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr,
                     PDL: tl.constexpr):
        pid = tl.program_id(0)
        cols = pid * BN + tl.arange(0, BN)
        cols_in = cols % N  # loads wrap, the store is masked
        w_tile = w_ptr + cols_in[:, None].to(tl.int64) * K + tl.arange(0, BK)[None, :]
        if HAS_BIAS:  # in flight with the first weight step, before the wait
            bias = tl.load(b_ptr + cols_in).to(tl.float32)
        else:
            bias = tl.zeros((BN,), dtype=tl.float32)
        acc0, acc1, acc2, acc3 = weight_row_products(x_ptr, w_tile, K, M, BN, BK, EVEN_K, PDL)
        keep = cols < N
        tl.store(y_ptr + cols, (tl.sum(acc0, axis=1) + bias).to(tl.bfloat16), mask=keep)
        if M > 1:
            tl.store(y_ptr + N + cols, (tl.sum(acc1, axis=1) + bias).to(tl.bfloat16), mask=keep)
        if M > 2:
            tl.store(y_ptr + 2 * N + cols, (tl.sum(acc2, axis=1) + bias).to(tl.bfloat16), mask=keep)
        if M > 3:
            tl.store(y_ptr + 3 * N + cols, (tl.sum(acc3, axis=1) + bias).to(tl.bfloat16), mask=keep)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, through the GEMV where pick_config says it is faster (decode's few rows on CUDA), else cuBLAS."""
    if x.is_cuda and x.dim() == 2 and x.dtype == torch.bfloat16 and x.is_contiguous():
        config = pick_config(x.shape[0], *weight.shape)
        if config is not None:
            return gemv(x, weight, bias, config=config)
    return torch.nn.functional.linear(x, weight, bias)

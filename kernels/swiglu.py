"""gpt-oss's clamped SwiGLU on interleaved gate/up columns.

    gate = x[:, 0::2].clamp(max=limit);  up = x[:, 1::2].clamp(-limit, limit)
    y = gate * sigmoid(alpha * gate) * (up + 1)

One thread per 8 outputs: it reads 16 interleaved inputs (two 16-byte loads) and
writes one 16-byte vector. bf16 in/out, float32 arithmetic.
"""

import functools  # no `from __future__ import annotations`: CuTeDSL evaluates annotations

import torch

from kernels._cute import VEC, check_rows, cute_modules, launch, pdl_wait, rows
from kernels.pdl import pdl_enabled

THREADS = 256


def swiglu_reference(x: torch.Tensor, alpha: float = 1.702, limit: float = 7.0) -> torch.Tensor:
    """Plain torch. x: [T, 2I] (gate, up interleaved) -> [T, I] in x's dtype."""
    xf = x.float()
    gate = xf[..., 0::2].clamp(max=limit)
    up = xf[..., 1::2].clamp(min=-limit, max=limit)
    return (gate * torch.sigmoid(alpha * gate) * (up + 1)).to(x.dtype)


@functools.cache
def _launcher(inter: int, dtype: torch.dtype, alpha: float, limit: float):
    cutlass, cute, _, cuda = cute_modules()
    Float32 = cutlass.Float32
    nvo = inter // VEC
    out_t = {torch.bfloat16: cutlass.BFloat16, torch.float16: cutlass.Float16, torch.float32: cutlass.Float32}[dtype]

    @cute.kernel
    def kernel(mX: cute.Tensor, mY: cute.Tensor):
        pdl_wait()
        tidx, _, _ = cute.arch.thread_idx()
        bidx, _, _ = cute.arch.block_idx()
        g = bidx * THREADS + tidx
        row = g // nvo
        col = g - row * nvo
        if row < mX.shape[0]:
            xin = cute.make_rmem_tensor((2 * VEC,), Float32)
            xin.store(mX[row, col, None].load().to(Float32))
            out = cute.make_rmem_tensor((VEC,), Float32)
            for i in cutlass.range_constexpr(VEC):
                gate = cute.arch.fmin(xin[2 * i], Float32(limit))
                up = cute.arch.fmax(cute.arch.fmin(xin[2 * i + 1], Float32(limit)), Float32(-limit))
                sig = Float32(1.0) / (Float32(1.0) + cute.math.exp(gate * Float32(-alpha), fastmath=True))
                out[i] = gate * sig * (up + Float32(1.0))
            mY[row, col, None].store(out.load().to(out_t))

    @cute.jit
    def launch(mX: cute.Tensor, mY: cute.Tensor, stream: cuda.CUstream):
        total = mX.shape[0] * nvo
        kernel(mX, mY).launch(grid=[(total + THREADS - 1) // THREADS, 1, 1], block=[THREADS, 1, 1], stream=stream,
                              use_pdl=pdl_enabled())

    return launch


def swiglu(x: torch.Tensor, alpha: float = 1.702, limit: float = 7.0, out: torch.Tensor | None = None) -> torch.Tensor:
    """CuTeDSL clamped SwiGLU. x: [T, 2I] contiguous, I a multiple of 8 -> [T, I]."""
    two_i = x.shape[-1]
    inter = two_i // 2
    x2 = x.reshape(-1, two_i)
    check_rows(x2, inter, "x")
    n = x2.shape[0]
    y = torch.empty(n, inter, dtype=x.dtype, device=x.device) if out is None else out.view(n, inter)
    if n:
        key = ("swiglu", inter, x.dtype, float(alpha), float(limit))
        launch(key, _launcher(*key[1:]), rows(x2.view(n, -1, 2 * VEC)), rows(y.view(n, -1, VEC)))
    return y.view(*x.shape[:-1], inter)

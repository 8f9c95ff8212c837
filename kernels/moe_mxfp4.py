"""Grouped MoE expert GEMM on MXFP4 weights (Triton): y = x W_e^T + b_e per expert group.

    x       [N, K]              bf16   rows grouped by expert (rows offsets[e]:offsets[e+1] -> expert e)
    blocks  [E, out, K/32, 16]  uint8  the checkpoint's packed e2m1 codes (even element in the low nibble)
    scales  [E, out, K/32]      uint8  e8m0 exponents (value = code * 2**(scale - 127))
    bias    [E, out]            bf16
    offsets [E+1]               int32  on the device
    y       [N, out]            bf16   or [N, out/2] with swiglu=(alpha, limit): gpt-oss's clamped
                                       SwiGLU of the interleaved gate/up columns, fused in the store

Hopper has no FP4 tensor cores, so the weights are a weight-only format: each program
loads a [BK/2, BN] tile of packed bytes and its [BN, BK/32] scales, widens them to bf16
in registers and multiplies with bf16 activations on the tensor cores, accumulating in
float32. On the GPU the widening is `tl.dot_scaled` (Triton's own fp4 -> bf16 upcast);
`dot_scaled=False` widens with plain integer/float ops instead (the path Triton's CPU
interpreter can run, and a fallback).

Decode (up to GEMV_ROWS routed rows, about one per touched expert) goes to a CUDA-core GEMV
instead, kernels/mxfp4_gemv.py (CuTeDSL): the tensor cores' path spends ~14 instructions per
weight byte on the widening and its layout change (byte-wise shared-memory reads), more than
the SM can issue at HBM speed. TILE_CONFIGS picks the tensor-core tile per N.

No host synchronisation: the grid is (min(N, cdiv(N, BM) + E), cdiv(out, BN)), enough M
tiles for any split of N rows into E groups (sum_e cdiv(n_e, BM) <= N/BM + E, and every
tile holds a row). Each program reads the E+1 offsets, counts every expert's tiles, and
finds the expert whose tile range holds its program id; programs past the last tile return
at once. So the launch is fixed for a given (N, E, out, K) and the step can be captured in
a CUDA graph.

Under TRITON_INTERPRET=1 the same kernel runs on CPU tensors in Triton's interpreter (slow;
for tests).
"""

from __future__ import annotations

import dataclasses
import os

import torch

from kernels.pdl import pdl_enabled
from services.worker.model.mxfp4 import BYTES_PER_BLOCK, VALUES_PER_SCALE, dequantize

try:  # optional: importing this module must work where Triton is absent (CPU CI, macOS)
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only without triton
    triton = tl = None

# Triton reads TRITON_INTERPRET when it decorates: then every kernel runs on the CPU.
_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@dataclasses.dataclass(frozen=True)
class TileConfig:
    """One launch shape: rows x outputs x reduction per program, warps, pipeline depth."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    swap_ab: bool = False  # compute (W x^T)^T: weight rows on the MMA's wide side, for few rows


# Keyed by N (routed rows, i.e. tokens * top-k): the first entry whose bound holds. Tuned on
# an H100 at gpt-oss-20b shapes (32 experts, K 2880, out 5760 / 2880; bench/kernels.py --experts
# and a sweep of each candidate at 1, 2, 4, 8, 16, 64 and 256 tokens).
# Decode past GEMV_ROWS on the tensor cores: the smallest MMA tile (BM 16) wastes no weight bytes
# on padding rows, BN 32 with 2 warps gives twice the programs of BN 64, BK 256 reads 128
# contiguous bytes of each weight row per step. Prefill is bound by the tensor cores: wide tiles
# reuse each widened weight tile over many rows.
TILE_CONFIGS: tuple[tuple[int, TileConfig], ...] = (
    (256, TileConfig(16, 32, 256, 2, 3)),
    (1024, TileConfig(32, 64, 128, 4, 4)),
    (4096, TileConfig(64, 128, 64, 4, 4)),  # 1024-4096 rows: -15% / -9% at 2048 / 4096 (bench.mxfp4_tiles)
    (1 << 62, TileConfig(128, 128, 64, 4, 4)),
)


# 1-4 tokens (N <= 16 routed rows, about one per touched expert): the CUDA-core GEMV of
# kernels/mxfp4_gemv.py, 1.5-1.9x the tensor-core decode tile there (`python -m bench.gemv
# --no-dense` at 5b99aa9). It reads an expert's weights once per row; past 16 rows, rows start to
# share experts and the MMA tiles reuse each widened weight tile.
GEMV_ROWS = 16
# Up to here, where the decode copies exist (services/worker/model/cuda_moe.py), the tensor-core GEMV
# with COLS routed rows a tile (kernels/mxfp4_mma.py) instead of this module's tiles. The MoE block at
# 8 / 16 / 32 / 64 tokens, H100 (`python -m bench.triton_kernels_moe`): 139.8 / 184.8 / 256.3 / 346.8 us
# with it, 201.7 / 236.7 / 266.4 / 273.5 with the tiles; so up to 32 tokens.
MMA_COLS_ROWS = 128


def tile_config(n_rows: int) -> TileConfig:
    """The tile config for N routed rows (TILE_CONFIGS' first bound >= N)."""
    for bound, config in TILE_CONFIGS:
        if n_rows <= bound:
            return config
    return TILE_CONFIGS[-1][1]


def grouped_mxfp4_linear_reference(
    x: torch.Tensor, blocks: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor, offsets: torch.Tensor,
    swiglu: tuple[float, float] | None = None,
) -> torch.Tensor:
    """Plain torch (host sync on offsets): dequantize each expert, matmul in float32.

    x [N, K] bf16; blocks [E, out, K/32, 16] uint8; scales [E, out, K/32] uint8; bias [E, out];
    offsets [E+1] int -> [N, out] in x's dtype, or swiglu_reference of it ([N, out/2]) with swiglu.
    """
    if swiglu is not None:
        from kernels.swiglu import swiglu_reference

        return swiglu_reference(grouped_mxfp4_linear_reference(x, blocks, scales, bias, offsets), *swiglu)
    out = torch.zeros(x.shape[0], blocks.shape[1], dtype=torch.float32, device=x.device)
    bounds = offsets.tolist()
    for e in range(blocks.shape[0]):
        start, end = bounds[e], bounds[e + 1]
        if end > start:
            w = dequantize(blocks[e], scales[e], torch.float32)  # [out, K]
            out[start:end] = x[start:end].float() @ w.T + bias[e].float()
    return out.to(x.dtype)


def _check(x, blocks, scales, bias, offsets, out, swiglu):
    if triton is None:
        raise ImportError("grouped_mxfp4_linear needs Triton: pip install triton (it ships with CUDA torch)")
    n, k = x.shape
    e, n_out = blocks.shape[:2]
    if x.dtype != torch.bfloat16 or not x.is_contiguous():
        raise ValueError(f"x must be contiguous bf16 [N, K], got {x.dtype} {tuple(x.shape)}")
    if k % VALUES_PER_SCALE:
        raise ValueError(f"K must be a multiple of {VALUES_PER_SCALE}, got {k}")
    groups = k // VALUES_PER_SCALE
    if blocks.dtype != torch.uint8 or tuple(blocks.shape) != (e, n_out, groups, BYTES_PER_BLOCK):
        raise ValueError(f"blocks must be uint8 [E, out, {groups}, {BYTES_PER_BLOCK}], got {blocks.dtype} "
                         f"{tuple(blocks.shape)}")
    if scales.dtype != torch.uint8 or tuple(scales.shape) != (e, n_out, groups):
        raise ValueError(f"scales must be uint8 [E, out, {groups}], got {scales.dtype} {tuple(scales.shape)}")
    if tuple(bias.shape) != (e, n_out):
        raise ValueError(f"bias must be [E, out] = [{e}, {n_out}], got {tuple(bias.shape)}")
    if offsets.dtype != torch.int32 or tuple(offsets.shape) != (e + 1,):
        raise ValueError(f"offsets must be int32 [E+1] = [{e + 1}], got {offsets.dtype} {tuple(offsets.shape)}")
    for name, t in (("blocks", blocks), ("scales", scales), ("bias", bias), ("offsets", offsets)):
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device}, x on {x.device}")
    if swiglu is not None and n_out % 2:
        raise ValueError(f"swiglu needs interleaved gate/up columns (an even out), got {n_out}")
    width = n_out // 2 if swiglu is not None else n_out
    if out is not None and (tuple(out.shape) != (n, width) or out.dtype != x.dtype or not out.is_contiguous()):
        raise ValueError(f"out must be contiguous {x.dtype} [{n}, {width}]")


def grouped_mxfp4_linear(
    x: torch.Tensor,
    blocks: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor,
    offsets: torch.Tensor,
    out: torch.Tensor | None = None,
    config: TileConfig | None = None,
    dot_scaled: bool | None = None,
    swiglu: tuple[float, float] | None = None,
) -> torch.Tensor:
    """Rows offsets[e]:offsets[e+1] of x times expert e's MXFP4 weight, transposed, plus bias[e].

    x [N, K] bf16 (contiguous); blocks [E, out, K/32, 16] uint8; scales [E, out, K/32] uint8;
    bias [E, out] bf16; offsets [E+1] int32 on x's device -> [N, out] bf16. Rows outside
    offsets[0]:offsets[E] are left unwritten. On CUDA, N <= GEMV_ROWS goes to the CuTeDSL GEMV
    (kernels/mxfp4_gemv.py) unless `config` picks a tensor-core tile; otherwise `config` overrides the tile table (tile_config(N)). `dot_scaled`
    picks the tensor-core kernel's widening (default: tl.dot_scaled on CUDA, plain ops elsewhere).
    swiglu=(alpha, limit) applies the clamped SwiGLU to the interleaved gate/up columns on the way
    out: y is then [N, out/2].
    """
    if config is None and x.is_cuda and x.shape[0] <= GEMV_ROWS:
        from kernels.mxfp4_gemv import mxfp4_gemv

        return mxfp4_gemv(x, blocks, scales, bias, offsets, out=out, swiglu=swiglu)
    _check(x, blocks, scales, bias, offsets, out, swiglu)
    n, k = x.shape
    num_experts, n_out = blocks.shape[:2]
    width = n_out // 2 if swiglu is not None else n_out
    y = torch.empty(n, width, dtype=x.dtype, device=x.device) if out is None else out
    if n == 0:
        return y
    cfg = tile_config(n) if config is None else config
    if dot_scaled is None:
        dot_scaled = x.is_cuda
    # every tile holds at least one row: no more tiles than rows, nor than N/BM + one per expert
    grid = (min(n, triton.cdiv(n, cfg.block_m) + num_experts), triton.cdiv(n_out, cfg.block_n))
    if not x.is_cuda and not _INTERPRETED:
        raise RuntimeError("grouped_mxfp4_linear on CPU tensors runs only under Triton's interpreter "
                           "(TRITON_INTERPRET=1 set before triton is imported)")
    alpha, limit = swiglu if swiglu is not None else (0.0, 0.0)
    epilogue = dict(SWIGLU=swiglu is not None, ALPHA=float(alpha), LIMIT=float(limit))
    pdl = x.is_cuda and pdl_enabled()
    _grouped_mxfp4_kernel[grid](
        x, blocks, scales, bias, offsets, y, N_OUT=n_out, K=k,
        NUM_EXPERTS=num_experts, EXPERTS_POW2=triton.next_power_of_2(num_experts),
        BM=cfg.block_m, BN=cfg.block_n, BK=cfg.block_k, EVEN_K=k % cfg.block_k == 0, DOT_SCALED=dot_scaled,
        SWAP_AB=cfg.swap_ab, INTERPRETED=_INTERPRETED, PDL=pdl, **epilogue,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, launch_pdl=pdl,
    )
    return y


if triton is not None:

    @triton.jit
    def _expert_tile(offsets_ptr, pid_m, NUM_EXPERTS: tl.constexpr, EXPERTS_POW2: tl.constexpr, BM: tl.constexpr):
        """(expert, first row, expert's end row) of M tile pid_m; expert == NUM_EXPERTS past the last tile."""
        # count each expert's tiles from the device offsets
        e = tl.arange(0, EXPERTS_POW2)
        real = e < NUM_EXPERTS
        starts = tl.load(offsets_ptr + e, mask=real, other=0)
        ends = tl.load(offsets_ptr + e + 1, mask=real, other=0)
        tiles = (ends - starts + BM - 1) // BM
        last = tl.cumsum(tiles, 0)  # one past each expert's last tile
        # experts whose tiles all end at or before pid_m come before ours (empty ones too)
        expert = tl.sum((last <= pid_m).to(tl.int32), 0)
        mine = e == expert
        first_tile = tl.sum(tl.where(mine, last - tiles, 0), 0)
        row_end = tl.sum(tl.where(mine, ends, 0), 0)
        row0 = tl.sum(tl.where(mine, starts, 0), 0) + (pid_m - first_tile) * BM
        return expert, row0, row_end

    @triton.jit
    def _store_tile(acc, y_ptr, rows, row_end, pid_n, N_OUT: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                    SWIGLU: tl.constexpr, ALPHA: tl.constexpr, LIMIT: tl.constexpr):
        """Store the [BM, BN] float32 tile (bias added) as bf16, or its SwiGLU as [BM, BN/2]."""
        if SWIGLU:
            # rounded to bf16 first, as the unfused path stores gate_up before kernels/swiglu.py reads it
            gate, up = tl.split(tl.reshape(acc.to(tl.bfloat16).to(tl.float32), (BM, BN // 2, 2)))
            gate = tl.minimum(gate, LIMIT)
            up = tl.minimum(tl.maximum(up, -LIMIT), LIMIT)
            h = gate * tl.sigmoid(ALPHA * gate) * (up + 1.0)
            cols = pid_n * (BN // 2) + tl.arange(0, BN // 2)
            keep = (rows < row_end)[:, None] & (cols < N_OUT // 2)[None, :]
            tl.store(y_ptr + rows[:, None].to(tl.int64) * (N_OUT // 2) + cols[None, :], h.to(tl.bfloat16), mask=keep)
        else:
            cols = pid_n * BN + tl.arange(0, BN)
            keep = (rows < row_end)[:, None] & (cols < N_OUT)[None, :]
            tl.store(y_ptr + rows[:, None].to(tl.int64) * N_OUT + cols[None, :], acc.to(tl.bfloat16), mask=keep)

    @triton.jit
    def _grouped_mxfp4_kernel(
        x_ptr, blocks_ptr, scales_ptr, bias_ptr, offsets_ptr, y_ptr, N_OUT: tl.constexpr, K: tl.constexpr,
        NUM_EXPERTS: tl.constexpr, EXPERTS_POW2: tl.constexpr,
        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, EVEN_K: tl.constexpr, DOT_SCALED: tl.constexpr,
        SWAP_AB: tl.constexpr, INTERPRETED: tl.constexpr,
        SWIGLU: tl.constexpr, ALPHA: tl.constexpr, LIMIT: tl.constexpr, PDL: tl.constexpr,
    ):
        if PDL:  # the tile's expert comes from the route before (kernels/pdl.py)
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)

        expert, row0, row_end = _expert_tile(offsets_ptr, pid_m, NUM_EXPERTS, EXPERTS_POW2, BM)
        if expert >= NUM_EXPERTS:  # past the last tile
            return
        rows = row0 + tl.arange(0, BM)
        cols = pid_n * BN + tl.arange(0, BN)

        # loads wrap rows and columns into range instead of masking (the stores are masked):
        # unmasked M/N loads stay vectorised
        rows_in = tl.minimum(rows, row_end - 1)
        cols_in = cols % N_OUT
        KB = K // 2  # packed bytes per weight row
        KG = K // 32  # scale groups per weight row
        expert = expert.to(tl.int64)  # E * out * K/2 can pass 2**31 (120b gate_up: 1.06e9 bytes)
        k_x = tl.arange(0, BK)
        k_w = tl.arange(0, BK // 2)
        k_s = tl.arange(0, BK // 32)
        w_base = blocks_ptr + expert * N_OUT * KB
        s_tile = scales_ptr + expert * N_OUT * KG + cols_in[:, None] * KG + k_s[None, :]  # [BN, BK/32]
        if SWAP_AB:  # acc^T = W x^T: the weight rows are the MMA's M side (wgmma wants M >= 64)
            x_tile = x_ptr + rows_in[None, :].to(tl.int64) * K + k_x[:, None]  # [BK, BM]
            w_tile = w_base + cols_in[:, None] * KB + k_w[None, :]  # [BN, BK/2]
            acc = tl.zeros((BN, BM), dtype=tl.float32)
        else:
            x_tile = x_ptr + rows_in[:, None].to(tl.int64) * K + k_x[None, :]  # [BM, BK]
            w_tile = w_base + cols_in[None, :] * KB + k_w[:, None]  # [BK/2, BN]
            acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, K, BK):
            if EVEN_K:
                a = tl.load(x_tile)  # bf16
                w = tl.load(w_tile)  # uint8, two codes a byte along K
                s = tl.load(s_tile)  # uint8
            else:
                x_in, w_in = k0 + k_x < K, k0 // 2 + k_w < KB
                s = tl.load(s_tile, mask=(k0 // 32 + k_s < KG)[None, :], other=0)
                if SWAP_AB:
                    a = tl.load(x_tile, mask=x_in[:, None], other=0.0)
                    w = tl.load(w_tile, mask=w_in[None, :], other=0)
                else:
                    a = tl.load(x_tile, mask=x_in[None, :], other=0.0)
                    w = tl.load(w_tile, mask=w_in[:, None], other=0)
            if DOT_SCALED:
                if SWAP_AB:
                    acc = tl.dot_scaled(w, s, "e2m1", a, None, "bf16", acc, fast_math=True)
                else:
                    acc = tl.dot_scaled(a, None, "bf16", w, s, "e2m1", acc, fast_math=True)
            else:
                if SWAP_AB:
                    w = tl.trans(w)  # [BK/2, BN]
                codes = tl.join(w & 0xF, w >> 4)  # [BK/2, BN, 2]: the low nibble is the even k
                codes = tl.permute(codes, (0, 2, 1)).reshape(BK, BN).to(tl.int32)
                magnitude = codes & 7
                # e2m1 with exponent field >= 1 is 2**(e-1) * (1 + m/2): its 3 bits shifted into
                # float32 with exponent bias 126; exponent field 0 (codes 0, 1) is 0 or 0.5
                normal = ((magnitude << 22) + (126 << 23)).to(tl.float32, bitcast=True)
                value = tl.where(magnitude < 2, magnitude.to(tl.float32) * 0.5, normal)
                value = tl.where((codes & 8) != 0, -value, value)
                # 2**(s - 127) from its float32 bits (s == 0 gives 0, not 2**-127: far below bf16 here)
                factor = (tl.trans(s).to(tl.int32) << 23).to(tl.float32, bitcast=True)  # [BK/32, BN]
                factor = tl.broadcast_to(factor[:, None, :], (BK // 32, 32, BN)).reshape(BK, BN)
                wide = (value * factor).to(tl.bfloat16)  # [BK, BN]
                if INTERPRETED:  # Triton 3.6's interpreter multiplies bf16's raw uint16 bits in tl.dot
                    a = a.to(tl.float32)
                    wide = wide.to(tl.float32)
                if SWAP_AB:
                    acc = tl.dot(tl.trans(wide), a, acc)
                else:
                    acc = tl.dot(a, wide, acc)
            x_tile += BK
            w_tile += BK // 2
            s_tile += BK // 32
        if SWAP_AB:
            acc = tl.trans(acc)  # [BM, BN]

        acc += tl.load(bias_ptr + expert * N_OUT + cols_in).to(tl.float32)[None, :]
        _store_tile(acc, y_ptr, rows, row_end, pid_n, N_OUT, BM, BN, SWIGLU, ALPHA, LIMIT)

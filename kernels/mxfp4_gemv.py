"""MXFP4 expert GEMV for decode (CuTeDSL): y = x W_e^T + b_e for each of a few routed rows.

    x       [N, K]              bf16   routed rows grouped by expert (offsets[e]:offsets[e+1] -> expert e)
    blocks  [E, out, K/32, 16]  uint8  the checkpoint's packed e2m1 codes (even element in the low nibble)
    scales  [E, out, K/32]      uint8  e8m0 exponents
    bias    [E, out]            bf16
    offsets [E+1]               int32  on the device
    y       [N, out] bf16, or [N, out/2] with swiglu=(alpha, limit) (the clamped SwiGLU of the
            interleaved gate/up outputs)

Same contract as kernels/moe_mxfp4.py's grouped_mxfp4_linear; this is its decode path. At a
token or a few, every weight byte is used once, so the kernel must widen fp4 as fast as HBM
delivers it. The Triton GEMV before it spent ~7 instructions per code (its x broadcast went
through shared memory every step): at one token (`python -m bench.gemv`, H100) gate_up with the
SwiGLU took 25.3 us and down 15.4 us there (f29330b), 21.5 and 14.0 us here (5b99aa9).

One CTA per (routed row, BN weight rows); thread t owns scale group t (32 values of K), for
every one of the CTA's weight rows. So each thread widens x's 32 values to float32 once, and
per weight row loads one 16-byte vector of codes and one scale byte. A code becomes float32 in
three integer instructions (inline PTX: mask, a multiply that places the magnitude and the
sign, mask) and one FMA. The per-thread partial sums of the BN rows are reduced across the
warp by a transposing butterfly (BN - 1 shuffles in all, each lane ends with one row), then
across the warps in shared memory.
"""

import functools  # no `from __future__ import annotations`: CuTeDSL evaluates annotations

import torch

from kernels import mxfp4_mma
from kernels._cute import cute_modules, fixed, launch, pdl_wait, rows
from kernels.device import sm_count
from kernels.moe_dispatch import expert_finder
from kernels.mxfp4_mma import TILE, mma_layout_ok, warps_for
from kernels.pdl import pdl_enabled

# Weight rows per CTA. `python -m bench.gemv --no-dense` at 5b99aa9 on an H100 at 20b shapes, 1..4
# tokens: 8 was within 4% of the fastest of 2, 4, 8, 16, 32 in every case; others were up to 42% slower.
ROWS_PER_CTA = 8
TWO_POW_126 = 8.507059173023462e37

# code j of a word (bits 4j..4j+3), j < 6: (u & MASK) * MUL puts the magnitude at float32 bits
# 22..24 and the sign at bit 31; j = 6, 7 need a shift right, which a multiply cannot do.
_MULS = [(0xF << (4 * j), (1 << (22 - 4 * j)) + (1 << (28 - 4 * j))) for j in range(6)]


def _word_ptx() -> str:
    """PTX: $0 = sum over the 8 e2m1 codes of word $1 of code_j * 2**-126 * x_j ($2..$9).

    e2m1 s|e1 e0|m with its magnitude at float32 bits 22..24 and sign at bit 31 is the value
    times 2**-126 (0.5 becomes a subnormal: fma.rn.f32 without .ftz keeps it).
    """
    lines = ["{", ".reg .b32 c;", ".reg .f32 a;"]
    for j in range(8):
        if j < 6:
            mask, mul = _MULS[j]
            lines += [f"and.b32 c, $1, {mask};", f"mul.lo.u32 c, c, {mul};"]
        elif j == 6:
            lines += ["shl.b32 c, $1, 4;", "shr.s32 c, c, 6;"]  # sign copied down over bits 25..31
        else:
            lines += ["shr.s32 c, $1, 6;"]
        lines.append("and.b32 c, c, 0x81C00000;")
        lines.append(f"mul.rn.f32 a, c, ${2 + j};" if j == 0 else f"fma.rn.f32 a, c, ${2 + j}, a;")
    lines += ["mov.f32 $0, a;", "}"]
    return "\n".join(lines)


def mxfp4_gemv_reference(x, blocks, scales, bias, offsets, swiglu=None, x_rows=None):
    """The grouped MXFP4 GEMM's torch reference (dequantize per expert, float32 matmul), on x[x_rows] if given."""
    from kernels.moe_mxfp4 import grouped_mxfp4_linear_reference

    xs = x if x_rows is None else x[x_rows.long()]
    return grouped_mxfp4_linear_reference(xs, blocks, scales, bias, offsets, swiglu=swiglu)


def mxfp4_gemv(x: torch.Tensor, blocks: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor,
               offsets: torch.Tensor, out: torch.Tensor | None = None,
               swiglu: tuple[float, float] | None = None, rows_per_cta: int | None = None,
               x_rows: torch.Tensor | None = None, repacked: bool = False, route_settled: bool = False,
               cols: int = 1) -> torch.Tensor:
    """Rows offsets[e]:offsets[e+1] of x times expert e's MXFP4 weight, transposed, plus bias[e] (see module doc).

    Rows outside offsets[0]:offsets[E] are left unwritten. x_rows (int32 [N], on the device): routed
    row i reads x[x_rows[i]] (x is then [T, K], the tokens before dispatch: no permuted copy).
    repacked: blocks are kernels.mxfp4_mma.repack's copy of the weights: run that module's
    tensor-core kernel, which needs out in 16-row tiles and every scale byte <= MMA_MAX_SCALE (the
    caller checks both once: mma_fits); else blocks are the checkpoint's and this module's FMA
    kernel runs. rows_per_cta: 16 for the MMA kernel, 2..32 for the FMA one (default 8).
    route_settled: offsets were written by a kernel two or more launches before this one (down after
    gate_up), so the MMA kernel starts its first weight copies before its PDL wait, while the kernel
    before finishes (kernels/pdl.py: that kernel passed its own wait, so its predecessor completed).
    cols (MMA kernel only): routed rows of one expert a tile multiplies together, 1 (one a tile: a token
    or a few) up to 8 (kernels/mxfp4_mma.COLS, for many rows: each weight tile is widened once for them).
    """
    from kernels.moe_mxfp4 import _check

    _check(x, blocks, scales, bias, offsets, out if x_rows is None else None, swiglu)
    n, k = x.shape
    if x_rows is not None:
        if x_rows.dtype != torch.int32 or x_rows.dim() != 1 or not x_rows.is_contiguous():
            raise ValueError(f"x_rows must be contiguous int32 [N], got {x_rows.dtype} {tuple(x_rows.shape)}")
        if x_rows.device != x.device:
            raise ValueError(f"x_rows is on {x_rows.device}, x on {x.device}")
        n = x_rows.shape[0]
    experts, n_out = blocks.shape[:2]
    if repacked and not (mma_layout_ok(blocks, scales) and bias.data_ptr() % 16 == 0):
        raise ValueError(f"the MMA kernel copies 16-row tiles: out ({n_out}) must be a multiple of {TILE} and "
                         "blocks, scales and bias 16-byte aligned")
    if rows_per_cta is None:
        rows_per_cta = TILE if repacked else ROWS_PER_CTA
    if rows_per_cta not in ((TILE,) if repacked else (2, 4, 8, 16, 32)):
        raise ValueError(f"rows_per_cta must be {'16' if repacked else 'a power of two 2..32'}, got {rows_per_cta}")
    if cols not in ((1, 2, 4, 8) if repacked else (1,)):
        raise ValueError(f"cols must be {'1, 2, 4 or 8' if repacked else '1 (the FMA kernel)'}, got {cols}")
    width = n_out // 2 if swiglu is not None else n_out
    if out is not None and (tuple(out.shape) != (n, width) or out.dtype != x.dtype or not out.is_contiguous()):
        raise ValueError(f"out must be contiguous {x.dtype} [{n}, {width}]")
    y = torch.empty(n, width, dtype=x.dtype, device=x.device) if out is None else out
    if n == 0:
        return y
    cutlass = cute_modules()[0]
    alpha, limit = swiglu if swiglu is not None else (0.0, 0.0)
    gather = x_rows is not None
    groups = k // 32
    if repacked:
        warps, stages = warps_for(k), mxfp4_mma.STAGES if cols == 1 else mxfp4_mma.COLS_STAGES
        key = ("mxfp4_mma", experts, n_out, k, warps, stages, mxfp4_mma.MATH, swiglu is not None,
               float(alpha), float(limit), gather, route_settled, cols)
        x_arg = rows(x.view(torch.int32).view(x.shape[0], k // 8, 4))
        n_tiles = mxfp4_mma.chunk_count(n, experts, cols) * (n_out // TILE)
        per_sm = mxfp4_mma.CTAS_PER_SM if cols == 1 else mxfp4_mma.COLS_CTAS_PER_SM
        sizes = (cutlass.Int32(n_tiles), cutlass.Int32(min(n_tiles, per_sm * sm_count(x.device))))
        jit_fn = mxfp4_mma.launcher(*key[1:])
    else:
        key = ("mxfp4_gemv", experts, n_out, k, rows_per_cta, swiglu is not None, float(alpha), float(limit), gather)
        x_arg = rows(x.view(x.shape[0], k // 8, 8))
        sizes = (cutlass.Int32(n),)
        jit_fn = _launcher(*key[1:])
    launch(key, jit_fn, x_arg,
           rows(x_rows if gather else offsets, align=4),  # the kernel reads it only when gathering
           fixed(blocks.view(torch.int32).view(experts * n_out, groups, 4)),
           fixed(scales.view(experts * n_out, groups), align=16 if repacked else 1),
           fixed(bias.view(-1), align=16 if repacked else 2),
           fixed(offsets, align=4), rows(y), *sizes)
    return y


@functools.cache
def _launcher(experts: int, n_out: int, k: int, bn: int, fuse_swiglu: bool, alpha: float, limit: float,
              gather: bool):
    cutlass, cute, _, cuda = cute_modules()
    from cutlass._mlir.dialects import llvm
    from cutlass.cutlass_dsl import T, dsl_user_op

    Float32, Int32 = cutlass.Float32, cutlass.Int32
    groups = k // 32
    warps = (groups + 31) // 32
    word_ptx = _word_ptx()
    find_expert = expert_finder(experts)
    row_shift = 5 - (bn.bit_length() - 1)  # after the butterfly lane l holds row l >> row_shift

    def asm(result_t, args, text, constraints, loc, ip):
        return llvm.inline_asm(result_t, [a.ir_value(loc=loc, ip=ip) for a in args], text, constraints,
                               has_side_effects=False, is_align_stack=False, asm_dialect=llvm.AsmDialect.AD_ATT)

    @dsl_user_op
    def word_dot(u, xs, *, loc=None, ip=None):
        return Float32(asm(T.f32(), [Int32(u)] + [Float32(v) for v in xs], word_ptx, "=f,r" + ",f" * 8, loc, ip))

    @dsl_user_op
    def exp2_bits(s, *, loc=None, ip=None):  # 2**(s - 127) from an e8m0 byte (0 for s == 0)
        return Float32(asm(T.f32(), [Int32(s)], "{.reg .b32 t; shl.b32 t, $1, 23; mov.b32 $0, t;}", "=f,r", loc, ip))

    @dsl_user_op
    def select(flag, a, b, *, loc=None, ip=None):  # flag != 0 ? a : b
        return Float32(asm(T.f32(), [Int32(flag), Float32(a), Float32(b)],
                           "{.reg .pred p; setp.ne.s32 p, $1, 0; selp.f32 $0, $2, $3, p;}", "=f,r,f,f", loc, ip))

    def row_dot(words, r, xs):  # (trace time) the 32 codes of row r's group times this thread's x
        total = Float32(0.0)
        for v in range(4):
            total = total + word_dot(words[r, v], [xs[v, j] for j in range(8)])
        return total

    def butterfly(part, lane):
        """(trace time) Warp sums of bn rows: each step halves the rows a lane holds; lane l ends with row l >> row_shift."""
        vals = [part[r] for r in range(bn)]
        offset = 16
        while len(vals) > 1:
            half = len(vals) // 2
            upper = lane & offset
            vals = [select(upper, vals[i + half], vals[i])
                    + cute.arch.shuffle_sync_bfly(select(upper, vals[i], vals[i + half]), offset=offset)
                    for i in range(half)]
            offset //= 2
        total = vals[0]
        while offset >= 1:
            total = total + cute.arch.shuffle_sync_bfly(total, offset=offset)
            offset //= 2
        return total

    @cute.kernel
    def kernel(mX: cute.Tensor, mR: cute.Tensor, mW: cute.Tensor, mS: cute.Tensor, mB: cute.Tensor,
               mO: cute.Tensor, mY: cute.Tensor):
        pdl_wait()  # the expert, hence every weight byte, depends on the route before
        tidx, _, _ = cute.arch.thread_idx()
        row, pid_n, _ = cute.arch.block_idx()
        lane = tidx % 32
        warp = tidx // 32
        found = cute.make_rmem_tensor((2,), Int32)
        find_expert(mO, row, lane, found)
        expert = found[0]
        routed = found[1] != 0  # rows outside every expert are left unwritten

        x_row = row
        if cutlass.const_expr(gather):
            x_row = mR[row]
        g = cutlass.min(tidx, groups - 1)  # a thread past the last group repeats it, then counts zero
        xs = cute.make_rmem_tensor((4, 8), Float32)
        xs.fill(0.0)
        if tidx < groups:
            for v in cutlass.range_constexpr(4):
                xs[v, None].store(mX[x_row, 4 * g + v, None].load().to(Float32))
        words = cute.make_rmem_tensor((bn, 4), Int32)
        part = cute.make_rmem_tensor((bn,), Float32)
        w_rows = [expert * n_out + cutlass.min(pid_n * bn + r, n_out - 1) for r in range(bn)]  # wrap; stores masked
        for r in cutlass.range_constexpr(bn):
            words[r, None].store(mW[w_rows[r], g, None].load())
        for r in cutlass.range_constexpr(bn):
            part[r] = row_dot(words, r, xs) * TWO_POW_126 * exp2_bits(mS[w_rows[r], g].to(Int32) & 0xFF)
        total = butterfly(part, lane)
        red = cute.make_tensor(cute.arch.alloc_smem(Float32, warps * 32, alignment=16),
                               cute.make_layout((warps, 32), stride=(32, 1)))
        red[warp, lane] = total
        cute.arch.sync_threads()
        if warp == 0:
            acc = red[0, lane]
            for w in cutlass.range_constexpr(1, warps):
                acc = acc + red[w, lane]
            r = lane >> row_shift
            col = cutlass.min(pid_n * bn + r, n_out - 1)
            value = (acc + mB[expert * n_out + col].to(Float32)).to(cutlass.BFloat16)
            if cutlass.const_expr(fuse_swiglu):
                # gate (even col) and up (odd col): rounded to bf16 first, as the unfused path stores gate_up
                pair = cute.arch.shuffle_sync_bfly(value.to(Float32), offset=1 << row_shift)
                gate = cutlass.min(value.to(Float32), Float32(limit))
                up = cutlass.max(cutlass.min(pair, Float32(limit)), Float32(-limit))
                h = gate / (Float32(1.0) + cute.math.exp(-Float32(alpha) * gate)) * (up + Float32(1.0))
                if (lane & ((2 << row_shift) - 1)) == 0 and pid_n * bn + r < n_out and routed:
                    mY[row, (pid_n * bn + r) // 2] = h.to(cutlass.BFloat16)
            else:
                if (lane & ((1 << row_shift) - 1)) == 0 and pid_n * bn + r < n_out and routed:
                    mY[row, pid_n * bn + r] = value

    @cute.jit
    def launch_fn(mX: cute.Tensor, mR: cute.Tensor, mW: cute.Tensor, mS: cute.Tensor, mB: cute.Tensor,
                  mO: cute.Tensor, mY: cute.Tensor, n: Int32, stream: cuda.CUstream):
        kernel(mX, mR, mW, mS, mB, mO, mY).launch(
            grid=[n, (n_out + bn - 1) // bn, 1], block=[32 * warps, 1, 1], stream=stream, use_pdl=pdl_enabled()
        )

    return launch_fn

"""MXFP4 expert GEMV on the tensor cores (CuTeDSL): a decode path of kernels/mxfp4_gemv.py.

Same contract as mxfp4_gemv (routed rows of x times their experts' packed weights, plus bias,
optionally the clamped SwiGLU). The FMA kernel there spends ~5.7 instructions a code; here the
hot loop spends ~2.9 (sm_90a SASS: 560 instructions for a lane's 192 codes of a tile): each
packed word becomes bf16 pairs in integer ops, is scaled in one bf16 multiply per pair, and the
tensor cores do the multiply-adds. The cuda backend runs decode's gate_up through it from two
tokens up and down through the FMA kernel (services/worker/model/cuda_moe.py says why).

Per warp, one m16n8k16 bf16 MMA takes 16 weight rows (A) by 16 values of K by 8 columns of x
(B; every column the same routed row, so the product's columns are equal). The sum over K
does not care which real K a fragment slot holds, so slots are mapped to what is cheap to
load and widen, with A and B always mapped alike:
  - lane (g, t) (g = lane / 4, t = lane % 4) owns scale group j = 4c + t of quad c (one 16-byte
    vector of 32 codes) for two rows of the 16-row tile, and the 32 x values of j;
  - the 8 codes of word v (nibble i = code 32j + 8v + i) become four bf16x2 pairs (nibble i,
    nibble i + 4); pairs 0, 1 fill one MMA's A (slots 2t, 2t+1 and 2t+8, 2t+9), pairs 2, 3
    the next's, and B gets x's matching pairs by byte permutes.
Widening: (u & 0x000F000F) * 0x1040 puts the even nibbles' magnitude at bf16 bits 6..8 and
their sign at bit 15 (products of the low half stay below bit 16), & 0x81C081C0 keeps those:
the e2m1 value times 2**-126 (0.5 becomes a subnormal). One mul.rn.bf16x2 by 2**(s - 1), s
the e8m0 byte, gives the exact dequantized weight (a normal bf16 for s <= MMA_MAX_SCALE);
the MMAs accumulate in float32 over the whole K, so no per-group step is left.

Memory: persistent CTAs loop over 16-row tiles (a routed row's expert, 16 output rows); one
thread starts the bulk copies of the next tile's weights and scales (each contiguous in the
checkpoint's layout) into shared memory while the CTA multiplies the current one. Without the
math (the quad loop compiled out: MATH = False, bench.gemv's "memory floor" row) this streamed
a one-token gate_up at 84% of the copy bandwidth (14.6 us); with it, 22.7 us,
no faster than the FMA kernel: the math, not the memory, is the floor at one token (deeper
pipelines measured slower). `python -m bench.gemv` sweeps quads per warp, CTAs and stages.
"""

import functools  # no `from __future__ import annotations`: CuTeDSL evaluates annotations

from kernels._cute import cute_modules, pdl_wait
from kernels.moe_dispatch import expert_finder
from kernels.pdl import pdl_enabled

# Largest e8m0 scale byte the bf16 multiplier 2**(s - 1) holds (exponent field s + 126 <= 254).
# Real checkpoints sit far below it (weights of magnitude > 12 would be needed); larger ones go
# to the FMA kernel (mma_fits).
MMA_MAX_SCALE = 128
# Quads (4 scale groups, 128 values of K) each warp multiplies per tile; sets the warps a CTA has.
QUADS_PER_WARP = 3
TILE = 16  # weight rows an MMA takes, and a CTA per step of its loop
STAGES = 2  # tiles a CTA holds in shared memory: the one multiplied, STAGES - 1 in flight
CTAS_PER_SM = 4  # the grid: persistent CTAs, each looping over tiles
# False compiles the quad loop out (loads, barriers and stores only): bench.gemv's memory floor.
MATH = True


def mma_scales_ok(*scales) -> bool:
    """Whether every scale byte fits the tensor-core kernel's multiplier (one host sync: call at load time)."""
    return all(int(s.max()) <= MMA_MAX_SCALE for s in scales if s.numel())


def mma_layout_ok(blocks, scales) -> bool:
    """Whether the kernel's 16-row bulk copies fit: out a multiple of 16, blocks and scales 16-byte aligned."""
    return blocks.shape[1] % TILE == 0 and blocks.data_ptr() % 16 == 0 and scales.data_ptr() % 16 == 0


def mma_fits(blocks, scales) -> bool:
    """Both of the above, for a projection's weights (at load time)."""
    return mma_layout_ok(blocks, scales) and mma_scales_ok(scales)


def warps_for(k: int) -> int:
    quads = (k // 32 + 3) // 4
    return max(1, min(8, -(-quads // QUADS_PER_WARP)))


_WIDEN = """{
.reg .b32 m, u;
and.b32 m, $4, 0x000F000F; mul.lo.u32 m, m, 0x1040; and.b32 m, m, 0x81C081C0; mul.rn.bf16x2 $0, m, $5;
and.b32 m, $4, 0x00F000F0; mul.lo.u32 m, m, 0x104; and.b32 m, m, 0x81C081C0; mul.rn.bf16x2 $1, m, $5;
shr.b32 u, $4, 8;
and.b32 m, u, 0x000F000F; mul.lo.u32 m, m, 0x1040; and.b32 m, m, 0x81C081C0; mul.rn.bf16x2 $2, m, $5;
and.b32 m, u, 0x00F000F0; mul.lo.u32 m, m, 0x104; and.b32 m, m, 0x81C081C0; mul.rn.bf16x2 $3, m, $5;
}"""
_MMA = ("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {$0,$1,$2,$3}, {$4,$5,$6,$7}, {$8,$9}, "
        "{$10,$11,$12,$13};")


@functools.cache
def launcher(experts: int, n_out: int, k: int, warps: int, stages: int, math: bool, fuse_swiglu: bool,
             alpha: float, limit: float, gather: bool):
    """The compiled-once launch function; arguments as mxfp4_gemv passes them (x as int32 [T, K/8, 4])."""
    cutlass, cute, _, cuda = cute_modules()
    from cutlass._mlir.dialects import llvm
    from cutlass.cutlass_dsl import T, dsl_user_op

    Float32, Int32 = cutlass.Float32, cutlass.Int32
    groups = k // 32
    quads = (groups + 3) // 4
    per_warp = -(-quads // warps)
    tiles_per_row = n_out // TILE
    expert_of = expert_finder(experts)

    def asm(result_t, args, text, constraints, loc, ip):
        return llvm.inline_asm(result_t, [a.ir_value(loc=loc, ip=ip) for a in args], text, constraints,
                               has_side_effects=False, is_align_stack=False, asm_dialect=llvm.AsmDialect.AD_ATT)

    def unpack(struct, n, t, loc, ip):
        return [llvm.extractvalue(t, struct, [i], loc=loc, ip=ip) for i in range(n)]

    @dsl_user_op
    def widen(word, mult, *, loc=None, ip=None):  # 8 codes -> 4 bf16x2 pairs (nibble i, i + 4) times mult
        i32 = T.i32()
        out = asm(llvm.StructType.get_literal([i32] * 4), [Int32(word), Int32(mult)], _WIDEN,
                  "=r,=r,=r,=r,r,r", loc, ip)
        return [Int32(v) for v in unpack(out, 4, i32, loc, ip)]

    @dsl_user_op
    def permute(a, b, selector, *, loc=None, ip=None):
        return Int32(asm(T.i32(), [Int32(a), Int32(b)], f"prmt.b32 $0, $1, $2, {selector};", "=r,r,r", loc, ip))

    @dsl_user_op
    def bulk_copy(dst, src, size, mbar, *, loc=None, ip=None):  # global -> shared, completing tx bytes on mbar
        args = [dst.toint(loc=loc, ip=ip), src.toint(loc=loc, ip=ip), Int32(size), mbar.toint(loc=loc, ip=ip)]
        llvm.inline_asm(None, [a.ir_value(loc=loc, ip=ip) for a in args],
                        "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [$0], [$1], $2, [$3];",
                        "r,l,r,r", has_side_effects=True, is_align_stack=False, asm_dialect=llvm.AsmDialect.AD_ATT)

    @dsl_user_op
    def mma(a, b, c, *, loc=None, ip=None):  # 4 A regs, 2 B regs, 4 C floats -> 4 D floats
        f32 = T.f32()
        out = asm(llvm.StructType.get_literal([f32] * 4), [Int32(v) for v in a + b] + [Float32(v) for v in c],
                  _MMA, "=f,=f,=f,=f" + ",r" * 6 + ",f" * 4, loc, ip)
        return [Float32(v) for v in unpack(out, 4, f32, loc, ip)]

    @cute.jit
    def issue(mO: cute.Tensor, mW: cute.Tensor, mS: cute.Tensor, w_tiles: cute.Tensor, s_tiles: cute.Tensor,
              mbar: cute.Pointer, stage: Int32, tile: Int32, lane: Int32):
        """(whole warp) Start the bulk copies of tile's 16 weight rows and their scales (each contiguous in the
        checkpoint's layout) into `stage`; they complete on its mbarrier `mbar`."""
        found = cute.make_rmem_tensor((2,), Int32)
        expert_of(mO, tile // tiles_per_row, lane, found)
        first = found[0] * n_out + (tile % tiles_per_row) * TILE
        if lane == 0:
            cute.arch.mbarrier_arrive_and_expect_tx(mbar, TILE * groups * 17)
            bulk_copy(w_tiles.iterator + stage * (TILE * groups * 4), mW.iterator + first * (groups * 4),
                      TILE * groups * 16, mbar)
            bulk_copy(s_tiles.iterator + stage * (TILE * groups), mS.iterator + first * groups, TILE * groups, mbar)

    @cute.jit
    def store_rows(red: cute.Tensor, mB: cute.Tensor, mY: cute.Tensor, expert: Int32, row: Int32, pid_n: Int32,
                   tidx: Int32):
        """Threads 0..15 (0..7 with the SwiGLU): the warps' sums plus bias, rounded to bf16 as the unfused
        path stores gate_up, then the clamped SwiGLU of each (gate, up) pair, into y's row."""
        if cutlass.const_expr(fuse_swiglu):
            if tidx < TILE // 2:
                pair = cute.make_rmem_tensor((2,), Float32)
                for p in cutlass.range_constexpr(2):
                    total = red[0, 2 * tidx + p]
                    for w in cutlass.range_constexpr(1, warps):
                        total = total + red[w, 2 * tidx + p]
                    bias = mB[expert * n_out + pid_n * TILE + 2 * tidx + p].to(Float32)
                    pair[p] = (total + bias).to(cutlass.BFloat16).to(Float32)
                gate = cutlass.min(pair[0], Float32(limit))
                up = cutlass.max(cutlass.min(pair[1], Float32(limit)), Float32(-limit))
                h = gate / (Float32(1.0) + cute.math.exp(-Float32(alpha) * gate)) * (up + Float32(1.0))
                mY[row, pid_n * (TILE // 2) + tidx] = h.to(cutlass.BFloat16)
        else:
            if tidx < TILE:
                total = red[0, tidx]
                for w in cutlass.range_constexpr(1, warps):
                    total = total + red[w, tidx]
                mY[row, pid_n * TILE + tidx] = (total + mB[expert * n_out + pid_n * TILE + tidx].to(Float32)).to(
                    cutlass.BFloat16)

    @cute.kernel
    def kernel(mX: cute.Tensor, mR: cute.Tensor, mW: cute.Tensor, mS: cute.Tensor, mB: cute.Tensor,
               mO: cute.Tensor, mY: cute.Tensor, n_tiles: Int32):
        pdl_wait()  # the experts, hence every weight byte, depend on the route before
        tidx, _, _ = cute.arch.thread_idx()
        cta, _, _ = cute.arch.block_idx()
        grid, _, _ = cute.arch.grid_dim()
        lane = tidx % 32
        warp = tidx // 32
        g = lane // 4
        t = lane % 4
        # MMA row g is tile row g with bits 0 and 1 swapped: the two rows a quarter-warp reads
        # then start 16 banks apart at K = 2880 (row stride 360 words), so its 128-bit reads don't conflict
        rg = (g & 4) | ((g & 1) << 1) | ((g >> 1) & 1)

        smem = cutlass.utils.SmemAllocator()
        # row-major stages, as the bulk copies write them (make_layout's default is column-major)
        w_tiles = smem.allocate_tensor(Int32, cute.make_layout((stages, TILE, groups, 4), stride=(
            TILE * groups * 4, groups * 4, 4, 1)), byte_alignment=128)
        s_tiles = smem.allocate_tensor(cutlass.Uint8, cute.make_layout((stages, TILE, groups), stride=(
            TILE * groups, groups, 1)), byte_alignment=16)
        red = smem.allocate_tensor(Float32, cute.make_layout((2, warps, TILE), stride=(warps * TILE, TILE, 1)),
                                   byte_alignment=16)
        mbars = smem.allocate_array(cutlass.Int64, stages, byte_alignment=8)
        if tidx == 0:
            for st in cutlass.range_constexpr(stages):
                cute.arch.mbarrier_init(mbars + st, 1)
            cute.arch.mbarrier_init_fence()
        cute.arch.sync_threads()

        # this CTA's tiles: cta, cta + grid, ...; stages - 1 of them in flight ahead of the one multiplied
        count = (n_tiles - cta + grid - 1) // grid
        if warp == 0:
            for st in cutlass.range_constexpr(stages - 1):
                if st < count:
                    issue(mO, mW, mS, w_tiles, s_tiles, mbars + st, Int32(st), cta + st * grid, lane)
        for i in cutlass.range(count):
            ahead = i + stages - 1  # its stage was freed by the barrier that ended tile i - 1
            if warp == 0 and ahead < count:
                issue(mO, mW, mS, w_tiles, s_tiles, mbars + ahead % stages, ahead % stages, cta + ahead * grid, lane)
            tile = cta + i * grid
            row = tile // tiles_per_row
            pid_n = tile % tiles_per_row
            x_row = row
            if cutlass.const_expr(gather):
                x_row = mR[row]
            stage = i % stages
            cute.arch.mbarrier_wait(mbars + stage, (i // stages) % 2)

            acc = cute.make_rmem_tensor((2, 4), Float32)
            acc.fill(0.0)
            xw = cute.make_rmem_tensor((4, 4), Int32)
            words = cute.make_rmem_tensor((2, 4), Int32)
            for q in cutlass.range_constexpr(per_warp if math else 0):
                j = 4 * (warp * per_warp + q) + t  # past the last group: clamped reads, multiplier 0
                jl = cutlass.min(j, groups - 1)
                for v in cutlass.range_constexpr(4):
                    xw[v, None].store(mX[x_row, 4 * jl + v, None].load())
                mults = []
                for h in cutlass.range_constexpr(2):  # rows rg and rg + 8
                    words[h, None].store(w_tiles[stage, rg + 8 * h, jl, None].load())
                    m = (s_tiles[stage, rg + 8 * h, jl].to(Int32) & 0xFF) * 128 + 0x3F00  # bf16 2**(s - 1), twice
                    mults.append((m | (m << 16)) & ~((groups - 1 - j) >> 31))
                for v in cutlass.range_constexpr(4):
                    b = [permute(xw[v, 0], xw[v, 2], "0x5410"), permute(xw[v, 0], xw[v, 2], "0x7632"),
                         permute(xw[v, 1], xw[v, 3], "0x5410"), permute(xw[v, 1], xw[v, 3], "0x7632")]
                    lo = widen(words[0, v], mults[0])
                    hi = widen(words[1, v], mults[1])
                    for c in cutlass.range_constexpr(2):  # pairs 0, 1 then 2, 3; two chains of MMAs
                        d = mma([lo[2 * c], hi[2 * c], lo[2 * c + 1], hi[2 * c + 1]], b[2 * c:2 * c + 2],
                                [acc[c, n] for n in range(4)])
                        for n in cutlass.range_constexpr(4):
                            acc[c, n] = d[n]
            if t == 0:  # D's columns are equal; lane (g, 0) holds tile rows rg (d0) and rg + 8 (d2)
                red[i % 2, warp, rg] = acc[0, 0] + acc[1, 0]
                red[i % 2, warp, rg + 8] = acc[0, 2] + acc[1, 2]
            cute.arch.sync_threads()  # the stage is read: free for the copy issued next iteration

            if warp == 0:  # (red is double-buffered: the next tile's writes go to the other half)
                found = cute.make_rmem_tensor((2,), Int32)
                expert_of(mO, row, lane, found)
                if found[1] != 0:
                    store_rows(red[i % 2, None, None], mB, mY, found[0], row, pid_n, tidx)

    @cute.jit
    def launch_fn(mX: cute.Tensor, mR: cute.Tensor, mW: cute.Tensor, mS: cute.Tensor, mB: cute.Tensor,
                  mO: cute.Tensor, mY: cute.Tensor, n_tiles: Int32, grid: Int32, stream: cuda.CUstream):
        kernel(mX, mR, mW, mS, mB, mO, mY, n_tiles).launch(
            grid=[grid, 1, 1], block=[32 * warps, 1, 1], stream=stream, use_pdl=pdl_enabled()
        )

    return launch_fn

"""MXFP4 expert GEMV on the tensor cores (CuTeDSL): the decode path of kernels/mxfp4_gemv.py.

Same contract as mxfp4_gemv (routed rows of x times their experts' weights, plus bias, optionally
the clamped SwiGLU), on a copy of the weights whose bits are rearranged at load (`repack`) so that
widening costs about one integer instruction a code: the checkpoint's nibbles keep each code's
sign next to its magnitude, but a bf16 wants them 7 bits apart, which took a multiply and two
masks per pair of codes plus a bf16 multiply by the scale.

Repacked word (8 codes of one weight row, K = 32j + 8t + 0..7 for scale group j, word t):
code pair p (K 2p, 2p + 1) comes out as one bf16x2 register, each half the e2m1 value times
2**-126 (sign at bit 15, exponent bits 1..0 and the mantissa bit at bits 8..6):
    pair 0: u & M            pair 1: rotl(u, 10) & M        pair 2: rotl(u, 13) & M
    pair 3: ((u & 0x001B001B) * 0x1084) & M                  (M = 0x81C081C0)
No four rotations of a code's bit field {6, 7, 8, 15} tile 16 bits (checked by enumeration), so the
last pair's bits sit where one multiply spreads them without carries. Within each quad of
scale groups the 16 words are stored transposed (16 bytes = word t of 4 groups), so a lane loads a
quad's words with one 128-bit read.

Per warp, m16n8k16 bf16 MMAs take 16 weight rows (A) by 16 values of K by 8 columns of x (B: every
column the same routed row, so the product's columns are equal). Lane (g, t) holds word t of a
group for rows g and g + 8: its pairs 0, 1 fill one MMA's A (slots 2t, 2t+1 and 2t+8, 2t+9),
pairs 2, 3 the next's, and B takes x's 8 values of that word straight from one 16-byte load. The
four lanes t of a row cover exactly one scale group, so the group's two MMAs are scaled after the
fact: one float32 FMA per row by 2**(s - 65). x is multiplied by 2**64 on load (exact in bf16), so
every product of the tiny widened weights is a normal float32.

Memory: persistent CTAs loop over 16-row tiles (a routed row's expert, 16 output rows); one warp
starts the bulk copies (cp.async.bulk + mbarrier) of the next tile's weights, scales, bias and
routed row of x, each contiguous, into a stage of shared memory while the CTA multiplies the
current one, and finds experts in a shared copy of the offsets: nothing between a tile's barriers
waits on global memory (that chain, not the instruction count, had set the one-token time;
docs/GPU.md). MATH = False compiles the multiply out (bench.gemv's "memory floor" row).
`python -m bench.gemv` sweeps the settings.

Columns (`cols` = COLS): past a token or a few, experts get several routed rows. Then a tile is one
expert's 16 weight rows by a chunk of up to COLS of its routed rows, each the B column of one lane
group g (the MMA's 8 columns, unused ones discarded), so a weight tile is read and widened once
for the chunk instead of once per routed row. The chunks are numbered expert by expert (each
expert's rows in cdiv(rows, cols) chunks; a table of their first chunk per expert, built from the
offsets at kernel start, maps a chunk to its expert). A CTA takes a contiguous run of the real
tiles (counted on the device), so its next tiles mostly share the chunk, and lanes read x's rows
from global memory, where L1 keeps them from tile to tile: copied into each stage, a chunk's x
outweighed the tile's weights. cols = 1 is the GEMV above, one routed row a tile.
"""

import functools  # no `from __future__ import annotations`: CuTeDSL evaluates annotations

import torch

from kernels._cute import cute_modules, pdl_wait
from kernels.bulk_copy import bulk_ops
from kernels.moe_dispatch import expert_finder
from kernels.pdl import pdl_enabled

# Largest e8m0 scale byte the post-MMA factor 2**(s - 65) holds as a float32 (exponent field
# s + 62 <= 254). Real checkpoints sit far below it; larger ones go to the FMA kernel (mma_fits).
MMA_MAX_SCALE = 192
QUADS_PER_WARP = 3  # quads (4 scale groups, 128 values of K) each warp multiplies per tile: sets the warps
TILE = 16  # weight rows an MMA takes, and a CTA per step of its loop
STAGES = 2  # tiles a CTA holds in shared memory (>= 2): the one multiplied, STAGES - 1 in flight
CTAS_PER_SM = 3  # the grid: persistent CTAs, each looping over tiles (~62 KB of shared memory each at K 2880)
COLS = 8  # routed rows of one expert a tile multiplies past GEMV_ROWS (the MMA's N)
COLS_STAGES = 2
COLS_CTAS_PER_SM = 2  # fewer than CTAS_PER_SM: L1 must keep each CTA's chunk of x (8 rows, 46 KB at K 2880)
# False compiles the quad loop out (loads, barriers and stores only): bench.gemv's memory floor.
MATH = True

MASK = 0x81C081C0  # a bf16x2's sign bits and the 3 low bits of exponent + mantissa that e2m1 fills
ROTATIONS = (0, 10, 13)  # pairs 0..2: rotl(u, r) & MASK
# pair 3: where each e2m1 bit (m0, e0, e1, sign) of a half sits; * LAST_MUL moves it to TARGET_BITS
LAST_BITS, LAST_MUL = (4, 0, 1, 3), 0x1084
TARGET_BITS = (6, 7, 8, 15)
X_SCALE_BF16X2 = 0x5F805F80  # 2**64 twice: x's prescale
FACTOR_BIAS = 62  # float32 exponent field of the group factor: s + 127 - 65


def _repacked_bit(code: int, bit: int) -> int:
    """Where bit `bit` (m0, e0, e1, sign) of code `code` (0..7, K order) of a checkpoint word goes."""
    pair, half = divmod(code, 2)
    if pair < len(ROTATIONS):
        return (TARGET_BITS[bit] + 16 * half - ROTATIONS[pair]) % 32
    return LAST_BITS[bit] + 16 * half


def repack(blocks: torch.Tensor) -> torch.Tensor:
    """The tensor-core kernel's copy of checkpoint blocks [E, out, K/32, 16] uint8 (same shape and size):
    each 32-bit word's bits rearranged (module doc), and each quad of scale groups' words transposed."""
    e, out, groups, _ = blocks.shape
    words = blocks.contiguous().view(torch.int32).view(e, out, groups, 4)
    packed = torch.zeros_like(words)
    for code in range(8):
        for bit in range(4):
            packed |= ((words >> (4 * code + bit)) & 1) << _repacked_bit(code, bit)
    full = groups // 4 * 4  # whole quads; a last partial quad is transposed on its own
    quads = packed[:, :, :full].reshape(e, out, full // 4, 4, 4).transpose(-1, -2)
    tail = packed[:, :, full:].transpose(-1, -2)
    flat = torch.cat([quads.reshape(e, out, -1), tail.reshape(e, out, -1)], dim=-1)
    return flat.contiguous().view(torch.uint8).view(e, out, groups, 16)


def widen_reference(word: int) -> list[int]:
    """The kernel's widening of one repacked word, in Python: four bf16x2 bit patterns (pairs 0..3)."""
    rotl = lambda u, r: ((u << r) | (u >> (32 - r))) & 0xFFFFFFFF if r else u  # noqa: E731
    pairs = [rotl(word, r) & MASK for r in ROTATIONS]
    return pairs + [((word & 0x001B001B) * LAST_MUL) & 0xFFFFFFFF & MASK]


def mma_scales_ok(*scales) -> bool:
    """Whether every scale byte fits the kernel's float32 factor (one host sync: call at load time)."""
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


def chunk_count(n: int, experts: int, cols: int) -> int:
    """Most chunks n routed rows can split into (sum over experts of cdiv(rows, cols)): the launch's fixed size."""
    return n if cols == 1 else min(n, (n + experts * (cols - 1)) // cols)


_WIDEN = f"""{{
.reg .b32 r;
and.b32 $0, $4, {MASK:#x};
shf.l.wrap.b32 r, $4, $4, {ROTATIONS[1]}; and.b32 $1, r, {MASK:#x};
shf.l.wrap.b32 r, $4, $4, {ROTATIONS[2]}; and.b32 $2, r, {MASK:#x};
and.b32 r, $4, 0x001B001B; mul.lo.u32 r, r, {LAST_MUL:#x}; and.b32 $3, r, {MASK:#x};
}}"""
_FACTOR = f"{{.reg .b32 t; mad.lo.u32 t, $1, {1 << 23}, {FACTOR_BIAS << 23}; mov.b32 $0, t;}}"
_PRESCALE = f"{{.reg .b32 c; mov.b32 c, {X_SCALE_BF16X2:#x}; mul.rn.bf16x2 $0, $1, c;}}"
_MMA = ("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {$0,$1,$2,$3}, {$4,$5,$6,$7}, {$8,$9}, "
        "{$10,$11,$12,$13};")


@functools.cache
def launcher(experts: int, n_out: int, k: int, warps: int, stages: int, math: bool, fuse_swiglu: bool,
             alpha: float, limit: float, gather: bool, early: bool, cols: int = 1):
    """The compiled-once launch function; arguments as mxfp4_gemv passes them (x as int32 [T, K/8, 4],
    weights repacked). early: the offsets were written two or more kernels before (mxfp4_gemv's
    route_settled), so the first tiles' weight copies start before the PDL wait. cols: routed rows a
    tile takes (1, or up to 8: the module doc's columns)."""
    cutlass, cute, _, cuda = cute_modules()
    from cutlass._mlir.dialects import llvm
    from cutlass.cutlass_dsl import T, dsl_user_op

    Float32, Int32 = cutlass.Float32, cutlass.Int32
    groups = k // 32
    quads = (groups + 3) // 4
    full_quads, tail = divmod(groups, 4)
    per_warp = -(-quads // warps)
    tiles_per_row = n_out // TILE
    expert_of = expert_finder(experts)
    bulk_copy = bulk_ops().load  # global -> shared, completing its bytes on an mbarrier
    # byte offsets of a stage's parts (each a multiple of 16 bytes long, as bulk copies want)
    scales_at = TILE * groups * 16
    bias_at = scales_at + TILE * groups
    x_at = bias_at + TILE * 2
    meta_at = x_at + (k * 2 if cols == 1 else 0)  # then 4 words: expert, in an expert (0/1), first routed row, rows
    stage_words = (meta_at + 16) // 4
    stage_tx = x_at + (k * 2 if cols == 1 else 0)  # what a stage's copies bring: weights, scales, bias (and x's row)
    n_cols = 1 if cols == 1 else 8  # the sums' columns: the MMA's 8 with several rows
    out_width = TILE // 2 if fuse_swiglu else TILE  # outputs a tile stores per routed row
    n_acc = 2 if cols == 1 else 4  # a lane's sums: its two rows (D's columns are equal), or each of its 4 D values

    def asm(result_t, args, text, constraints, loc, ip):
        return llvm.inline_asm(result_t, [a.ir_value(loc=loc, ip=ip) for a in args], text, constraints,
                               has_side_effects=False, is_align_stack=False, asm_dialect=llvm.AsmDialect.AD_ATT)

    def unpack(struct, n, t, loc, ip):
        return [llvm.extractvalue(t, struct, [i], loc=loc, ip=ip) for i in range(n)]

    @dsl_user_op
    def widen(word, *, loc=None, ip=None):  # a repacked word -> its 4 bf16x2 pairs (value * 2**-126)
        i32 = T.i32()
        out = asm(llvm.StructType.get_literal([i32] * 4), [Int32(word)], _WIDEN, "=r,=r,=r,=r,r", loc, ip)
        return [Int32(v) for v in unpack(out, 4, i32, loc, ip)]

    @dsl_user_op
    def prescale(pair, *, loc=None, ip=None):  # a bf16x2 of x times 2**64 (exact)
        return Int32(asm(T.i32(), [Int32(pair)], _PRESCALE, "=r,r", loc, ip))

    @dsl_user_op
    def group_factor(s, *, loc=None, ip=None):  # float32 2**(s - 65) from an e8m0 byte: bits (s + 62) << 23
        return Float32(asm(T.f32(), [Int32(s) & 0xFF], _FACTOR, "=f,r", loc, ip))

    @dsl_user_op
    def load_gpu(ptr, *, loc=None, ip=None):  # an int32 read coherently at the GPU's scope (skipping L1)
        return Int32(asm(T.i32(), [ptr.toint(loc=loc, ip=ip)], "ld.relaxed.gpu.global.b32 $0, [$1];", "=r,l",
                         loc, ip))

    @dsl_user_op
    def mma(a, b, c, *, loc=None, ip=None):  # 4 A regs, 2 B regs, 4 C floats -> 4 D floats
        f32 = T.f32()
        out = asm(llvm.StructType.get_literal([f32] * 4), [Int32(v) for v in a + b] + [Float32(v) for v in c],
                  _MMA, "=f,=f,=f,=f" + ",r" * 6 + ",f" * 4, loc, ip)
        return [Float32(v) for v in unpack(out, 4, f32, loc, ip)]

    def stage_views(st):
        """(trace time) A stage's parts: weights [TILE, groups, 4] int32 (row-major, as the bulk copy writes them:
        make_layout's default is column-major), scales [TILE, groups] u8, bias [TILE] bf16, x [K/8, 4] int32."""
        base = st.iterator
        w = cute.make_tensor(base, cute.make_layout((TILE, groups, 4), stride=(groups * 4, 4, 1)))
        sc = cute.make_tensor(cute.recast_ptr(base + scales_at // 4, dtype=cutlass.Uint8),
                              cute.make_layout((TILE, groups), stride=(groups, 1)))
        b = cute.make_tensor(cute.recast_ptr(base + bias_at // 4, dtype=cutlass.BFloat16), cute.make_layout((TILE,)))
        xs = cute.make_tensor(base + x_at // 4, cute.make_layout((k // 8, 4), stride=(4, 1)))  # cols == 1
        return w, sc, b, xs

    @cute.jit
    def issue_tile(mW: cute.Tensor, mS: cute.Tensor, mB: cute.Tensor, st: cute.Tensor, mbar: cute.Pointer,
                   first: Int32):
        """(one thread) The bulk copies of 16 weight rows from row `first` of [E * out], their scales and bias."""
        bulk_copy(st.iterator, mW.iterator + first * (groups * 4), TILE * groups * 16, mbar)
        bulk_copy(st.iterator + scales_at // 4, mS.iterator + first * groups, TILE * groups, mbar)
        bulk_copy(st.iterator + bias_at // 4, mB.iterator + first, TILE * 2, mbar)

    @cute.jit
    def issue_weights(offsets: cute.Tensor, chunks: cute.Tensor, mW: cute.Tensor, mS: cute.Tensor, mB: cute.Tensor,
                      st: cute.Tensor, mbar: cute.Pointer, tile: Int32, lane: Int32):
        """(whole warp) Start the bulk copies of tile's 16 weight rows, their scales and bias into stage `st`
        (completing on `mbar`, which then still waits for issue_x's copies), and note there the tile's expert,
        whether its chunk holds rows, its first routed row and how many."""
        found = cute.make_rmem_tensor((2,), Int32)
        chunk = tile // tiles_per_row
        first_row = chunk
        rows = Int32(1)  # cols == 1: the routed row is copied even outside every expert (then not stored)
        if cutlass.const_expr(cols == 1):
            expert_of(offsets, chunk, lane, found)
        else:
            expert_of(chunks, chunk, lane, found)
            first_row = offsets[found[0]] + (chunk - chunks[found[0]]) * cols
            rows = cutlass.min(Int32(cols), offsets[found[0] + 1] - first_row) * found[1]
        first = found[0] * n_out + (tile % tiles_per_row) * TILE
        if lane == 0:
            # the notes first: the arrive releases them to the warps that wait on mbar
            st[meta_at // 4] = found[0]
            st[meta_at // 4 + 1] = found[1]
            st[meta_at // 4 + 2] = first_row
            st[meta_at // 4 + 3] = rows
            # cols > 1: only real tiles (the CTAs split chunks[E] * tiles_per_row), and no x in the stage
            cute.arch.mbarrier_arrive_and_expect_tx(mbar, stage_tx)
            issue_tile(mW, mS, mB, st, mbar, first)

    @cute.jit
    def issue_x(mR: cute.Tensor, mX: cute.Tensor, st: cute.Tensor, mbar: cute.Pointer, lane: Int32):
        """(whole warp, after the PDL wait and issue_weights on `st`) cols == 1: start the bulk copy of the
        tile's routed row of x into stage `st` (with several, lanes read x themselves)."""
        if cutlass.const_expr(cols == 1):
            if lane == 0:
                x_row = st[meta_at // 4 + 2]
                if cutlass.const_expr(gather):
                    x_row = mR[x_row]
                bulk_copy(st.iterator + x_at // 4, mX.iterator + x_row * (k // 2), k * 2, mbar)

    @cute.jit
    def store_rows(red: cute.Tensor, bias: cute.Tensor, mY: cute.Tensor, first_row: Int32, rows: Int32,
                   pid_n: Int32, lane: Int32):
        """(warp 0) For each of the tile's routed rows c < rows and its 16 outputs (8 with the SwiGLU): the
        warps' sums plus bias, rounded to bf16 as the unfused path stores gate_up, then the clamped SwiGLU of
        each (gate, up) pair, into y's row first_row + c."""
        for q in cutlass.range_constexpr((out_width * cols + 31) // 32):
            c = (lane + 32 * q) // out_width
            o = (lane + 32 * q) % out_width
            if c < rows:
                if cutlass.const_expr(fuse_swiglu):
                    pair = cute.make_rmem_tensor((2,), Float32)
                    for p in cutlass.range_constexpr(2):
                        total = red[0, 2 * o + p, c]
                        for w in cutlass.range_constexpr(1, warps):
                            total = total + red[w, 2 * o + p, c]
                        pair[p] = (total + bias[2 * o + p].to(Float32)).to(cutlass.BFloat16).to(Float32)
                    gate = cutlass.min(pair[0], Float32(limit))
                    up = cutlass.max(cutlass.min(pair[1], Float32(limit)), Float32(-limit))
                    h = gate / (Float32(1.0) + cute.math.exp(-Float32(alpha) * gate)) * (up + Float32(1.0))
                    mY[first_row + c, pid_n * out_width + o] = h.to(cutlass.BFloat16)
                else:
                    total = red[0, o, c]
                    for w in cutlass.range_constexpr(1, warps):
                        total = total + red[w, o, c]
                    mY[first_row + c, pid_n * out_width + o] = (total + bias[o].to(Float32)).to(cutlass.BFloat16)

    @cute.jit
    def quad_words(w_tile: cute.Tensor, words: cute.Tensor, rg: Int32, c: Int32, t: Int32):
        """words[h, i] = word t of group 4c + i of tile rows rg + 8h (zero past the last group)."""
        if cutlass.const_expr(tail == 0):
            for h in cutlass.range_constexpr(2):
                words[h, None].store(w_tile[rg + 8 * h, 4 * c + t, None].load())
        else:
            if c < full_quads:
                for h in cutlass.range_constexpr(2):
                    words[h, None].store(w_tile[rg + 8 * h, 4 * c + t, None].load())
            else:  # the partial quad: word t of its `tail` groups at 16 * full_quads + tail * t + i
                words.fill(0)
                for h in cutlass.range_constexpr(2):
                    for i in cutlass.range_constexpr(tail):
                        at = tail * t + i
                        words[h, i] = w_tile[rg + 8 * h, 4 * full_quads + at // 4, at % 4]

    @cute.kernel
    def kernel(mX: cute.Tensor, mR: cute.Tensor, mW: cute.Tensor, mS: cute.Tensor, mB: cute.Tensor,
               mO: cute.Tensor, mY: cute.Tensor, n_tiles: Int32):
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
        # one stage (int32 words): weights, scales, bias, x (stage_views), then (expert, routed) of the tile's row
        stages_mem = smem.allocate_tensor(Int32, cute.make_layout((stages, stage_words), stride=(stage_words, 1)),
                                          byte_alignment=128)
        red = smem.allocate_tensor(Float32, cute.make_layout((2, warps, TILE, n_cols),
                                                             stride=(warps * TILE * n_cols, TILE * n_cols, n_cols, 1)),
                                   byte_alignment=16)
        offsets = smem.allocate_tensor(Int32, cute.make_layout((experts + 1,)), byte_alignment=16)
        chunks = smem.allocate_tensor(Int32, cute.make_layout((experts + 1,)), byte_alignment=16)  # cols > 1
        mbars = smem.allocate_array(cutlass.Int64, stages, byte_alignment=8)
        if cutlass.const_expr(not early):
            pdl_wait()  # the experts, hence every weight byte, depend on the route before
        for e in cutlass.range(tidx, experts + 1, 32 * warps):
            # early: the kernel before this one passed its PDL wait, so the one before that, which wrote
            # the offsets, has completed; read them at L2 (an SM's L1 may hold an earlier layer's)
            offsets[e] = load_gpu(mO.iterator + e) if cutlass.const_expr(early) else mO[e]
        if tidx == 0:
            for s in cutlass.range_constexpr(stages):
                cute.arch.mbarrier_init(mbars + s, 1)
            cute.arch.mbarrier_init_fence()
        cute.arch.sync_threads()
        if cutlass.const_expr(cols > 1):  # each expert's first chunk: its rows in cdiv(rows, cols) chunks
            if tidx == 0:
                running = Int32(0)
                for e in cutlass.range(experts):
                    chunks[e] = running
                    running = running + (offsets[e + 1] - offsets[e] + (cols - 1)) // cols
                chunks[experts] = running
            cute.arch.sync_threads()

        # this CTA's tiles: cta, cta + grid, ...; with several rows a tile, a contiguous run of the real ones
        # (first_tile, first_tile + 1, ...: next tiles share the chunk, and x stays in L1); stages - 1 of them
        # in flight ahead of the one multiplied
        first_tile = cta
        step = grid
        count = (n_tiles - cta + grid - 1) // grid
        if cutlass.const_expr(cols > 1):
            real = chunks[experts] * tiles_per_row
            first_tile = cta * real // grid
            step = Int32(1)
            count = (cta + 1) * real // grid - first_tile
        if warp == 0:
            for s in cutlass.range_constexpr(stages - 1):
                if s < count:
                    issue_weights(offsets, chunks, mW, mS, mB, stages_mem[s, None], mbars + s, first_tile + s * step,
                                  lane)
        if cutlass.const_expr(early):
            pdl_wait()  # x is the kernel before's output
        if warp == 0:
            for s in cutlass.range_constexpr(stages - 1):
                if s < count:
                    issue_x(mR, mX, stages_mem[s, None], mbars + s, lane)
        for i in cutlass.range(count):
            ahead = i + stages - 1  # its stage was freed by the barrier that ended tile i - 1
            if warp == 0 and ahead < count:
                st = stages_mem[ahead % stages, None]
                issue_weights(offsets, chunks, mW, mS, mB, st, mbars + ahead % stages, first_tile + ahead * step, lane)
                issue_x(mR, mX, st, mbars + ahead % stages, lane)
            tile = first_tile + i * step
            stage = i % stages
            w_tile, s_tile, bias, xs = stage_views(stages_mem[stage, None])
            cute.arch.mbarrier_wait(mbars + stage, (i // stages) % 2)

            # tile rows rg, rg + 8 (cols > 1: their columns 2t, 2t + 1: D's fragment d0, d1, d2, d3)
            acc = cute.make_rmem_tensor((n_acc,), Float32)
            acc.fill(0.0)
            # cols > 1: the routed row lane group g's B column takes (past the chunk's rows its last, discarded)
            x_row = stages_mem[stage, meta_at // 4 + 2] + cutlass.min(g, stages_mem[stage, meta_at // 4 + 3] - 1)
            if cutlass.const_expr(gather and cols > 1):
                x_row = mR[x_row]
            xw = cute.make_rmem_tensor((4,), Int32)
            words = cute.make_rmem_tensor((2, 4), Int32)
            for q in cutlass.range_constexpr(per_warp if math else 0):
                c = warp * per_warp + q
                if c < quads:
                    quad_words(w_tile, words, rg, c, t)
                    for gi in cutlass.range_constexpr(4):
                        j = cutlass.min(4 * c + gi, groups - 1)  # past the last group: zero words
                        if cutlass.const_expr(cols == 1):
                            xw.store(xs[4 * j + t, None].load())
                        else:
                            xw.store(mX[x_row, 4 * j + t, None].load())
                        b = [prescale(xw[p]) for p in range(4)]
                        lo = widen(words[0, gi])
                        hi = widen(words[1, gi])
                        zero = Float32(0.0)
                        d = mma([lo[0], hi[0], lo[1], hi[1]], b[0:2], [zero, zero, zero, zero])
                        d = mma([lo[2], hi[2], lo[3], hi[3]], b[2:4], d)
                        # d0, d1 are row rg, d2, d3 row rg + 8, each scaled by its row's group
                        top = group_factor(s_tile[rg, j].to(Int32))
                        bottom = group_factor(s_tile[rg + 8, j].to(Int32))
                        if cutlass.const_expr(cols == 1):  # D's columns are equal
                            acc[0] = acc[0] + d[0] * top
                            acc[1] = acc[1] + d[2] * bottom
                        else:
                            acc[0] = acc[0] + d[0] * top
                            acc[1] = acc[1] + d[1] * top
                            acc[2] = acc[2] + d[2] * bottom
                            acc[3] = acc[3] + d[3] * bottom
            if cutlass.const_expr(cols == 1):
                if t == 0:
                    red[i % 2, warp, rg, 0] = acc[0]
                    red[i % 2, warp, rg + 8, 0] = acc[1]
            else:
                red[i % 2, warp, rg, 2 * t] = acc[0]
                red[i % 2, warp, rg, 2 * t + 1] = acc[1]
                red[i % 2, warp, rg + 8, 2 * t] = acc[2]
                red[i % 2, warp, rg + 8, 2 * t + 1] = acc[3]
            cute.arch.sync_threads()  # the stage is read: free for the copy issued next iteration

            if warp == 0:  # (red is double-buffered: the next tile's writes go to the other half)
                if stages_mem[stage, meta_at // 4 + 1] != 0:  # rows outside every expert are left unwritten
                    store_rows(red[i % 2, None, None, None], bias, mY, stages_mem[stage, meta_at // 4 + 2],
                               stages_mem[stage, meta_at // 4 + 3], tile % tiles_per_row, lane)

    @cute.jit
    def launch_fn(mX: cute.Tensor, mR: cute.Tensor, mW: cute.Tensor, mS: cute.Tensor, mB: cute.Tensor,
                  mO: cute.Tensor, mY: cute.Tensor, n_tiles: Int32, grid: Int32, stream: cuda.CUstream):
        kernel(mX, mR, mW, mS, mB, mO, mY, n_tiles).launch(
            grid=[grid, 1, 1], block=[32 * warps, 1, 1], stream=stream, use_pdl=pdl_enabled()
        )

    return launch_fn

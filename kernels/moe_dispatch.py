"""MoE dispatch (permute token rows by expert) and combine (weighted un-permute).

    route:    ids [T, k] -> counts [E], offsets [E+1], pos [T*k] (sorted slot of each
              (token, choice)), src [T*k] (token row of each sorted slot)
    dispatch: xs[p] = x[src[p]]                      -> [T*k, H], grouped by expert
    combine:  y[t] = sum_j weights[t, j] * ys[pos[t*k + j]]   -> [T, H]

Routing is one CTA: shared-memory atomics count tokens per expert (the returned old
count is the token's rank in its group; the order within a group is whatever the
atomics give, which no consumer depends on), one thread turns counts into offsets.
`route_topk` does the router's top-k (kernels/router.py) in that same CTA first, for
decode's few tokens.
Dispatch and combine move 16-byte vectors, one per thread; combine sums in float32.
"""

import functools  # no `from __future__ import annotations`: CuTeDSL evaluates annotations

import torch

from kernels._cute import VEC, check_rows, cute_modules, fixed, launch, pdl_wait, rows
from kernels.bulk_copy import bulk_ops
from kernels.device import sm_count
from kernels.pdl import pdl_enabled

THREADS = 256
ROUTE_THREADS = 1024
# route_topk's single CTA up to this many tokens (every decode graph bucket), router_topk + route above.
# Not yet timed against the pair (bench.kernels prints both rows); with it (and without PDL) the decode
# replay at batch 1 and 64 stayed where baa251e's was (docs/BENCHMARKS.md, the PDL / XQA table).
ROUTE_TOPK_MAX_TOKENS = 256
DISPATCH_STAGES = 0
DISPATCH_CTAS_PER_SM = 8


def route_reference(ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain torch. ids: [T, k] -> (counts [E] int32, offsets [E+1] int32)."""
    counts = torch.bincount(ids.reshape(-1).long(), minlength=num_experts).to(torch.int32)
    offsets = torch.zeros(num_experts + 1, dtype=torch.int32, device=ids.device)
    offsets[1:] = torch.cumsum(counts, 0)
    return counts, offsets


def moe_reference(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, expert_fn) -> torch.Tensor:
    """Plain torch MoE around `expert_fn(e, rows [n, H]) -> [n, H]`: y[t] = sum_j w[t,j] * f(ids[t,j], x[t])."""
    y = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for e in ids.unique().tolist():
        tok, choice = (ids == e).nonzero(as_tuple=True)
        y.index_add_(0, tok, weights[tok, choice, None].float() * expert_fn(e, x[tok]).float())
    return y.to(x.dtype)


@functools.cache
def _placer(num_experts: int, k: int):
    """A @cute.jit function: the end of routing, once every (token, choice) i holds its expert in mIds[i]
    and its rank within the expert in mPos[i] (s_count: the experts' counts in shared memory).

    One thread turns the counts into offsets; then each i's sorted slot p = offset + rank goes
    to mPos[i], and mSrc[p] = its token.
    """
    cutlass, cute, _, _ = cute_modules()
    Int32 = cutlass.Int32

    @cute.jit
    def place(tidx: Int32, n: Int32, s_count: cute.Tensor, s_off: cute.Tensor, mIds: cute.Tensor,
              mCounts: cute.Tensor, mOffsets: cute.Tensor, mPos: cute.Tensor, mSrc: cute.Tensor):
        cute.arch.sync_threads()
        if tidx == 0:
            running = Int32(0)
            for e in cutlass.range(num_experts):
                c = s_count[e]
                mCounts[e] = c
                mOffsets[e] = running
                s_off[e] = running
                running = running + c
            mOffsets[num_experts] = running
        cute.arch.sync_threads()
        for i in cutlass.range(tidx, n, ROUTE_THREADS):
            p = s_off[mIds[i]] + mPos[i]
            mPos[i] = p
            mSrc[p] = i // k

    return place


@functools.cache
def expert_finder(num_experts: int):
    """A @cute.jit function (mO, row, lane, found), run by a whole warp: found[0] = the expert whose rows
    offsets[e]:offsets[e+1] hold routed row `row` (how many experts end at or before it), found[1] = 1 if
    offsets[0] <= row < offsets[E] (rows outside every expert are left unwritten), else 0."""
    cutlass, cute, _, _ = cute_modules()
    Int32 = cutlass.Int32

    @cute.jit
    def find(mO: cute.Tensor, row: Int32, lane: Int32, found: cute.Tensor):
        before = Int32(0)
        for c in cutlass.range_constexpr((num_experts + 31) // 32):
            e = cutlass.min(lane + 32 * c, num_experts - 1)
            if lane + 32 * c < num_experts:
                before = before + Int32(1) + ((row - mO[e + 1]) >> 31)  # 1 when offsets[e + 1] <= row
        found[0] = cutlass.min(cute.arch.warp_reduction_sum(before), num_experts - 1)
        found[1] = Int32(0)
        if row >= mO[0] and row < mO[num_experts]:
            found[1] = Int32(1)

    return find


@functools.cache
def _route_launcher(num_experts: int, k: int):
    cutlass, cute, _, cuda = cute_modules()
    Int32 = cutlass.Int32
    place = _placer(num_experts, k)

    @cute.kernel
    def kernel(mIds: cute.Tensor, mCounts: cute.Tensor, mOffsets: cute.Tensor, mPos: cute.Tensor, mSrc: cute.Tensor):
        pdl_wait()
        tidx, _, _ = cute.arch.thread_idx()
        smem = cutlass.utils.SmemAllocator()
        s_count = smem.allocate_tensor(Int32, cute.make_layout((num_experts,)), 16)
        s_off = smem.allocate_tensor(Int32, cute.make_layout((num_experts,)), 16)
        n = mIds.shape[0]
        for e in cutlass.range(tidx, num_experts, ROUTE_THREADS):
            s_count[e] = Int32(0)
        cute.arch.sync_threads()
        for i in cutlass.range(tidx, n, ROUTE_THREADS):
            e = mIds[i]
            mPos[i] = cute.arch.atomic_add((s_count.iterator + e).llvm_ptr, Int32(1), scope="cta")
        place(tidx, n, s_count, s_off, mIds, mCounts, mOffsets, mPos, mSrc)

    @cute.jit
    def launch(mIds: cute.Tensor, mCounts: cute.Tensor, mOffsets: cute.Tensor, mPos: cute.Tensor, mSrc: cute.Tensor,
               stream: cuda.CUstream):
        kernel(mIds, mCounts, mOffsets, mPos, mSrc).launch(grid=[1, 1, 1], block=[ROUTE_THREADS, 1, 1], stream=stream,
                                                           use_pdl=pdl_enabled())

    return launch


@functools.cache
def _route_topk_launcher(num_experts: int, k: int, dtype: torch.dtype):
    """Router top-k + softmax and route in one CTA: each warp takes tokens warp, warp + 32, ..."""
    from kernels.router import warp_topk

    cutlass, cute, _, cuda = cute_modules()
    Int32, Float32 = cutlass.Int32, cutlass.Float32
    topk = warp_topk(num_experts, k)
    place = _placer(num_experts, k)
    warps = ROUTE_THREADS // 32

    @cute.kernel
    def kernel(mL: cute.Tensor, mIds: cute.Tensor, mW: cute.Tensor, mCounts: cute.Tensor, mOffsets: cute.Tensor,
               mPos: cute.Tensor, mSrc: cute.Tensor):
        pdl_wait()
        tidx, _, _ = cute.arch.thread_idx()
        lane = tidx % 32
        smem = cutlass.utils.SmemAllocator()
        s_count = smem.allocate_tensor(Int32, cute.make_layout((num_experts,)), 16)
        s_off = smem.allocate_tensor(Int32, cute.make_layout((num_experts,)), 16)
        tokens = mL.shape[0]
        for e in cutlass.range(tidx, num_experts, ROUTE_THREADS):
            s_count[e] = Int32(0)
        cute.arch.sync_threads()
        top_i = cute.make_rmem_tensor((k,), Int32)
        top_w = cute.make_rmem_tensor((k,), Float32)
        for t in cutlass.range(tidx // 32, tokens, warps):
            topk(mL, t, lane, top_i, top_w)
            if lane == 0:
                for r in cutlass.range_constexpr(k):
                    e = top_i[r]
                    mIds[t * k + r] = e
                    mW[t, r] = top_w[r]
                    mPos[t * k + r] = cute.arch.atomic_add((s_count.iterator + e).llvm_ptr, Int32(1), scope="cta")
        place(tidx, tokens * k, s_count, s_off, mIds, mCounts, mOffsets, mPos, mSrc)

    @cute.jit
    def launch(mL: cute.Tensor, mIds: cute.Tensor, mW: cute.Tensor, mCounts: cute.Tensor, mOffsets: cute.Tensor,
               mPos: cute.Tensor, mSrc: cute.Tensor, stream: cuda.CUstream):
        kernel(mL, mIds, mW, mCounts, mOffsets, mPos, mSrc).launch(grid=[1, 1, 1], block=[ROUTE_THREADS, 1, 1],
                                                                   stream=stream, use_pdl=pdl_enabled())

    return launch


@functools.cache
def _gather_launcher(hidden: int, dtype: torch.dtype):
    """out[p] = x[src[p]] for p < len(src): the dispatch permutation (and the embedding gather)."""
    cutlass, cute, _, cuda = cute_modules()
    nvec = hidden // VEC

    @cute.kernel
    def kernel(mX: cute.Tensor, mSrc: cute.Tensor, mOut: cute.Tensor):
        pdl_wait()
        tidx, _, _ = cute.arch.thread_idx()
        bidx, _, _ = cute.arch.block_idx()
        g = bidx * THREADS + tidx
        row = g // nvec
        col = g - row * nvec
        if row < mOut.shape[0]:
            mOut[row, col, None].store(mX[mSrc[row], col, None].load())

    @cute.jit
    def launch(mX: cute.Tensor, mSrc: cute.Tensor, mOut: cute.Tensor, stream: cuda.CUstream):
        total = mOut.shape[0] * nvec
        kernel(mX, mSrc, mOut).launch(grid=[(total + THREADS - 1) // THREADS, 1, 1], block=[THREADS, 1, 1],
                                      stream=stream, use_pdl=pdl_enabled())

    return launch


@functools.cache
def _scatter_launcher(hidden: int, k: int, dtype: torch.dtype):
    """out[pos[t, j]] = x[t] for every choice j: dispatch reading each token row once."""
    cutlass, cute, _, cuda = cute_modules()
    nvec = hidden // VEC

    @cute.kernel
    def kernel(mX: cute.Tensor, mPos: cute.Tensor, mOut: cute.Tensor):
        pdl_wait()
        tidx, _, _ = cute.arch.thread_idx()
        bidx, _, _ = cute.arch.block_idx()
        g = bidx * THREADS + tidx
        row = g // nvec
        col = g - row * nvec
        if row < mX.shape[0]:
            v = mX[row, col, None].load()
            for j in cutlass.range_constexpr(k):
                mOut[mPos[row, j], col, None].store(v)

    @cute.jit
    def launch(mX: cute.Tensor, mPos: cute.Tensor, mOut: cute.Tensor, stream: cuda.CUstream):
        total = mX.shape[0] * nvec
        kernel(mX, mPos, mOut).launch(grid=[(total + THREADS - 1) // THREADS, 1, 1], block=[THREADS, 1, 1],
                                      stream=stream, use_pdl=pdl_enabled())

    return launch


@functools.cache
def _bulk_scatter_launcher(hidden: int, k: int, dtype: torch.dtype, stages: int, ctas: int):
    """out[pos[t, j]] = x[t] for every choice j, on the copy engine, by one-warp CTAs: lane 0 bulk-loads a
    token row into shared memory, then lanes j < k each bulk-store it to slot pos[t, j].

    stages = 0: a CTA a token row. Else `ctas` persistent CTAs, each looping over rows cta, cta + grid, ...
    with `stages` row buffers: the loads of the next stages - 1 rows are in flight while it stores one.
    """
    cutlass, cute, _, cuda = cute_modules()
    Int32, Int64 = cutlass.Int32, cutlass.Int64
    bulk = bulk_ops()
    row_bytes = hidden * torch.tensor([], dtype=dtype).element_size()
    bufs = max(stages, 1)

    @cute.jit
    def issue_load(mX: cute.Tensor, buf, mbar, row):
        cute.arch.mbarrier_arrive_and_expect_tx(mbar, row_bytes)
        bulk.load(buf, mX.iterator + Int64(row) * hidden, row_bytes, mbar)

    @cute.jit
    def store_row(mOut: cute.Tensor, buf, slot, lane):
        if lane < k:
            bulk.proxy_fence()
            bulk.store(mOut.iterator + Int64(slot) * hidden, buf, row_bytes)
            bulk.store_commit_wait_read()  # the buffer must outlive the stores' reads

    @cute.kernel
    def kernel(mX: cute.Tensor, mPos: cute.Tensor, mOut: cute.Tensor):
        lane, _, _ = cute.arch.thread_idx()
        cta, _, _ = cute.arch.block_idx()
        grid, _, _ = cute.arch.grid_dim()
        smem = cutlass.utils.SmemAllocator()
        buf = smem.allocate_tensor(mX.element_type, cute.make_layout((bufs, hidden), stride=(hidden, 1)),
                                   byte_alignment=128)
        mbars = smem.allocate_array(Int64, bufs, byte_alignment=8)
        if lane == 0:
            for s in cutlass.range_constexpr(bufs):
                cute.arch.mbarrier_init(mbars + s, 1)
            cute.arch.mbarrier_init_fence()
        pdl_wait()
        if cutlass.const_expr(stages == 0):
            if lane == 0:
                issue_load(mX, buf.iterator, mbars, cta)
            slot = Int32(0)
            if lane < k:
                slot = mPos[cta, lane]
            cute.arch.sync_threads()  # the mbarrier's init, before any lane waits on it
            cute.arch.mbarrier_wait(mbars, 0)
            store_row(mOut, buf.iterator, slot, lane)
        else:
            count = (mX.shape[0] - cta + grid - 1) // grid
            if lane == 0:
                for s in cutlass.range_constexpr(stages):
                    if s < count:
                        issue_load(mX, buf.iterator + s * hidden, mbars + s, cta + s * grid)
            cute.arch.sync_threads()
            for i in cutlass.range(count):
                s = i % stages
                slot = Int32(0)
                if lane < k:
                    slot = mPos[cta + i * grid, lane]
                cute.arch.mbarrier_wait(mbars + s, (i // stages) % 2)
                store_row(mOut, buf.iterator + s * hidden, slot, lane)
                cute.arch.sync_threads()  # every store has read the buffer: refill it
                if lane == 0 and i + stages < count:
                    issue_load(mX, buf.iterator + s * hidden, mbars + s, cta + (i + stages) * grid)

    @cute.jit
    def launch(mX: cute.Tensor, mPos: cute.Tensor, mOut: cute.Tensor, stream: cuda.CUstream):
        grid = mX.shape[0]
        if cutlass.const_expr(stages > 0):
            grid = cutlass.min(grid, ctas)
        kernel(mX, mPos, mOut).launch(grid=[grid, 1, 1], block=[32, 1, 1], stream=stream, use_pdl=pdl_enabled())

    return launch


@functools.cache
def _combine_launcher(hidden: int, k: int, dtype: torch.dtype):
    cutlass, cute, _, cuda = cute_modules()
    Float32 = cutlass.Float32
    nvec = hidden // VEC
    out_t = {torch.bfloat16: cutlass.BFloat16, torch.float16: cutlass.Float16, torch.float32: cutlass.Float32}[dtype]

    @cute.kernel
    def kernel(mYs: cute.Tensor, mPos: cute.Tensor, mW: cute.Tensor, mOut: cute.Tensor):
        pdl_wait()
        tidx, _, _ = cute.arch.thread_idx()
        bidx, _, _ = cute.arch.block_idx()
        g = bidx * THREADS + tidx
        row = g // nvec
        col = g - row * nvec
        if row < mOut.shape[0]:
            acc = cute.make_rmem_tensor((VEC,), Float32)
            acc.fill(0.0)
            for j in cutlass.range_constexpr(k):
                acc.store(acc.load() + mYs[mPos[row, j], col, None].load().to(Float32) * mW[row, j].to(Float32))
            mOut[row, col, None].store(acc.load().to(out_t))

    @cute.jit
    def launch(mYs: cute.Tensor, mPos: cute.Tensor, mW: cute.Tensor, mOut: cute.Tensor, stream: cuda.CUstream):
        total = mOut.shape[0] * nvec
        kernel(mYs, mPos, mW, mOut).launch(
            grid=[(total + THREADS - 1) // THREADS, 1, 1], block=[THREADS, 1, 1], stream=stream, use_pdl=pdl_enabled()
        )

    return launch


class Routing:
    """Where each (token, choice) went: counts/offsets [E(+1)] int32, pos/src [T*k] int32."""

    def __init__(self, counts: torch.Tensor, offsets: torch.Tensor, pos: torch.Tensor, src: torch.Tensor, k: int):
        self.counts, self.offsets, self.pos, self.src, self.k = counts, offsets, pos, src, k


def empty_routing(tokens: int, k: int, num_experts: int, device) -> Routing:
    """Uninitialised routing buffers (reusable across steps of one size)."""
    new = lambda n: torch.empty(n, dtype=torch.int32, device=device)  # noqa: E731
    return Routing(new(num_experts), new(num_experts + 1), new(tokens * k), new(tokens * k), k)


def route(ids: torch.Tensor, num_experts: int, out: Routing | None = None) -> Routing:
    """CuTeDSL routing of ids [T, k] int32 (contiguous) into expert groups."""
    tokens, k = ids.shape
    n = tokens * k
    routing = empty_routing(tokens, k, num_experts, ids.device) if out is None else out
    counts, offsets, pos, src = routing.counts, routing.offsets, routing.pos, routing.src
    flat = ids.reshape(-1).to(torch.int32).contiguous()
    if n:
        launch(("route", num_experts, k), _route_launcher(num_experts, k),
               rows(flat, 4), fixed(counts, 4), fixed(offsets, 4), rows(pos, 4), rows(src, 4))
    else:
        counts.zero_()
        offsets.zero_()
    return routing


def route_topk(logits: torch.Tensor, k: int, out: Routing | None = None) -> tuple[Routing, torch.Tensor]:
    """kernels/router.py's router_topk, then `route`, in one single-CTA kernel: (routing, weights [T, k] float32).

    For decode's few tokens (ROUTE_TOPK_MAX_TOKENS), where the two launches cost more than the
    work; the one CTA's warps take 1/32 of the tokens each, so many tokens are faster split.
    """
    tokens, num_experts = logits.shape
    if not logits.is_contiguous():
        raise ValueError("logits must be contiguous")
    if k > num_experts:
        raise ValueError(f"k={k} > {num_experts} experts")
    routing = empty_routing(tokens, k, num_experts, logits.device) if out is None else out
    weights = torch.empty(tokens, k, dtype=torch.float32, device=logits.device)
    if tokens:
        ids = torch.empty(tokens * k, dtype=torch.int32, device=logits.device)
        key = ("route_topk", num_experts, k, logits.dtype)
        launch(key, _route_topk_launcher(*key[1:]), rows(logits, logits.element_size()), rows(ids, 4),
               rows(weights, 4), fixed(routing.counts, 4), fixed(routing.offsets, 4), rows(routing.pos, 4),
               rows(routing.src, 4))
    else:
        routing.counts.zero_()
        routing.offsets.zero_()
    return routing, weights


def gather_rows(x: torch.Tensor, index: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """CuTeDSL row gather: out[i] = x[index[i]]. x: [N, H] contiguous; index: [M] int -> [M, H]."""
    hidden = x.shape[-1]
    check_rows(x, hidden, "x")
    m = index.shape[0]
    out = torch.empty(m, hidden, dtype=x.dtype, device=x.device) if out is None else out
    if m:
        launch(("gather", hidden, x.dtype), _gather_launcher(hidden, x.dtype), rows(x.view(x.shape[0], -1, VEC)),
               rows(index.to(torch.int32).contiguous(), 4), rows(out.view(m, -1, VEC)))
    return out


def dispatch(x: torch.Tensor, routing: Routing, out: torch.Tensor | None = None, bulk: bool = True,
             stages: int | None = None) -> torch.Tensor:
    """Token rows permuted into expert order: [T*k, H], rows offsets[e]:offsets[e+1] go to expert e.

    A scatter (each token row read once, written to its k slots) rather than a gather
    by `src` (each token row read k times). bulk: on the copy engine (_bulk_scatter_launcher), else one
    16-byte vector a thread (bench.dispatch_bound times both).
    """
    hidden = x.shape[-1]
    check_rows(x, hidden, "x")
    tokens, k = x.shape[0], routing.k
    out = torch.empty(tokens * k, hidden, dtype=x.dtype, device=x.device) if out is None else out
    check_rows(out, hidden, "out")
    if tokens and bulk:
        stages = DISPATCH_STAGES if stages is None else stages
        ctas = sm_count(x.device) * DISPATCH_CTAS_PER_SM
        key = ("bulk scatter", hidden, k, x.dtype, stages, ctas)
        launch(key, _bulk_scatter_launcher(*key[1:]), rows(x), rows(routing.pos.view(tokens, k), 4), rows(out))
    elif tokens:
        launch(("scatter", hidden, k, x.dtype), _scatter_launcher(hidden, k, x.dtype), rows(x.view(tokens, -1, VEC)),
               rows(routing.pos.view(tokens, k), 4), rows(out.view(tokens * k, -1, VEC)))
    return out


def combine(
    ys: torch.Tensor, routing: Routing, weights: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Weighted un-permute. ys: [T*k, H] in expert order; weights: [T, k] float32 -> [T, H]."""
    hidden = ys.shape[-1]
    check_rows(ys, hidden, "ys")
    tokens, k = weights.shape
    out = torch.empty(tokens, hidden, dtype=ys.dtype, device=ys.device) if out is None else out
    if tokens:
        launch(("combine", hidden, k, ys.dtype), _combine_launcher(hidden, k, ys.dtype),
               rows(ys.view(ys.shape[0], -1, VEC)), rows(routing.pos.view(tokens, k), 4),
               rows(weights.float().contiguous(), 4), rows(out.view(tokens, -1, VEC)))
    return out

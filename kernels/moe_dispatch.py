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
Dispatch runs on the copy engine (cp.async.bulk: one CTA a token row, loaded once, stored k
times); combine moves 16-byte vectors, one per thread, and sums in float32.
"""

import functools  # no `from __future__ import annotations`: CuTeDSL evaluates annotations

import torch

from kernels._cute import VEC, check_rows, cute_modules, fixed, launch, pdl_wait, rows
from kernels.bulk_copy import bulk_ops
from kernels.pdl import pdl_enabled

THREADS = 256
ROUTE_THREADS = 1024
# route_topk's single CTA up to this many tokens (every decode graph bucket), router_topk + route above.
# Not yet timed against the pair (bench.kernels prints both rows); with it (and without PDL) the decode
# replay at batch 1 and 64 stayed where baa251e's was (docs/BENCHMARKS.md, the PDL / XQA table).
ROUTE_TOPK_MAX_TOKENS = 256
# The bulk dispatch holds a token row in a CTA's shared memory: rows up to the 48 KiB a CTA gets without
# opting in to more (gpt-oss: 5.6 KiB); wider ones take the vector form.
BULK_ROW_BYTES = 48 << 10


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
def _bulk_scatter_launcher(hidden: int, k: int, dtype: torch.dtype):
    """out[pos[t, j]] = x[t] for every choice j, on the copy engine, one one-warp CTA a token row: lane 0
    bulk-loads the row into shared memory, then lanes j < k each bulk-store it to slot pos[t, j].

    At 4096 tokens of gpt-oss-20b every CTA is resident at once (32 a SM), so all rows' loads are in
    flight together; persistent CTAs looping over rows through 2-6 buffers measured slower
    (docs/BENCHMARKS.md, bench.dispatch_bound).
    """
    cutlass, cute, _, cuda = cute_modules()
    Int32, Int64 = cutlass.Int32, cutlass.Int64
    bulk = bulk_ops()
    row_bytes = hidden * dtype.itemsize

    @cute.kernel
    def kernel(mX: cute.Tensor, mPos: cute.Tensor, mOut: cute.Tensor):
        lane, _, _ = cute.arch.thread_idx()
        row, _, _ = cute.arch.block_idx()
        smem = cutlass.utils.SmemAllocator()
        buf = smem.allocate_tensor(mX.element_type, cute.make_layout((hidden,)), byte_alignment=128)
        mbar = smem.allocate_array(Int64, 1, byte_alignment=8)
        if lane == 0:
            cute.arch.mbarrier_init(mbar, 1)
            cute.arch.mbarrier_init_fence()
        pdl_wait()
        if lane == 0:
            cute.arch.mbarrier_arrive_and_expect_tx(mbar, row_bytes)
            bulk.load(buf.iterator, mX.iterator + Int64(row) * hidden, row_bytes, mbar)
        slot = Int32(0)
        if lane < k:
            slot = mPos[row, lane]
        cute.arch.sync_threads()  # the mbarrier's init, before any lane waits on it
        if lane < k:
            cute.arch.mbarrier_wait(mbar, 0)
            bulk.proxy_fence()
            bulk.store(mOut.iterator + Int64(slot) * hidden, buf.iterator, row_bytes)
            bulk.store_commit_wait_read()  # the CTA's shared memory must outlive the stores' reads

    @cute.jit
    def launch(mX: cute.Tensor, mPos: cute.Tensor, mOut: cute.Tensor, stream: cuda.CUstream):
        kernel(mX, mPos, mOut).launch(grid=[mX.shape[0], 1, 1], block=[32, 1, 1], stream=stream,
                                      use_pdl=pdl_enabled())

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


def dispatch(x: torch.Tensor, routing: Routing, out: torch.Tensor | None = None, bulk: bool = True) -> torch.Tensor:
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
    if tokens and bulk and hidden * x.element_size() <= BULK_ROW_BYTES:
        launch(("bulk scatter", hidden, k, x.dtype), _bulk_scatter_launcher(hidden, k, x.dtype), rows(x),
               rows(routing.pos.view(tokens, k), 4), rows(out))
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

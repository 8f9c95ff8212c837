"""Split-KV decode attention with sinks (Triton): few sequences spread over every SM.

XQA (kernels/decode_attention.py) runs one CTA per (sequence, kv head) here: at one sequence that
is 8 CTAs streaming the whole context each, latency-bound (`python -m bench.profile_step --batch 1`
with ROSE_PDL=0: 18.1 us a full layer at 1024 tokens, 12.1 us a sliding one). Its own split merges
in-kernel through semaphores and disagreed with eager steps inside CUDA graphs (see there). This is
flash-decoding:

    partial[row, head, split] = softmax-weighted sum over the split's keys (unnormalised), with its
                                running max m and row sum l (log2 units)
    out[row, head] = sum_s exp2(m_s - M) partial_s / (sum_s exp2(m_s - M) l_s + exp2(sink - M)),
                     M = max(m_s, sink): the sink (natural-log units, times log2 e) joins the row sum only

The last of a (row, kv head)'s split programs to finish (an atomic ticket, zeroed again by it) merges its
GROUP heads, so a layer's decode attention is one launch (ROSE_SPLIT_MERGE=kernel: a second kernel merges).

Keys are the sequence's first `length` cache slots through its page table, or with `window` the
newest `window` of them (gpt-oss: q_pos - k_pos < window). Each program takes one kv head's GROUP
query heads (padded to 16 rows for tl.dot) over a contiguous share of the keys, so every split
count gives the same sums up to float32 rounding.
"""

from __future__ import annotations

import math
import os

import torch

from kernels.pdl import pdl_enabled

try:  # optional: importing this module must work where Triton is absent (CPU CI, macOS)
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only without triton
    triton = tl = None

# Triton reads TRITON_INTERPRET when it decorates: then the kernels run on CPU tensors (tests)
_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
BLOCK_N = 32  # keys per step of a program's loop (two 16-slot pages)
# A row's newest keys that may have been written in this step, read only after the PDL wait: its own, and in a
# step that runs a prompt chunk one row a token (services/worker/model/cuda_graphs.as_decode_rows, chunks of
# at most this many tokens) the chunk's keys before it
FRESH_KEYS = 64
MAX_SPLITS = 32
LOG2E = 1.4426950408889634
# The last split of a (row, kv head) merges it, by ticket; ROSE_SPLIT_MERGE=kernel: a second kernel does (A/B:
# `bench.decode_step` at batch 1 replayed 2.035 ms fused against 2.125 with the kernel, one H100 call). Read
# once, at import, so eager steps and the graphs captured later merge alike.
FUSED_MERGE = os.environ.get("ROSE_SPLIT_MERGE", "fused") != "kernel"


def splits_for(rows: int, kv_heads: int, sm_count: int) -> int:
    """Programs per (row, kv head): about two waves of the SMs in all, a power of two <= MAX_SPLITS."""
    want = math.ceil(2 * sm_count / (rows * kv_heads))
    return min(MAX_SPLITS, 1 << max(0, want - 1).bit_length())


class SplitScratch:
    """split_decode's buffers for up to `rows` rows (fixed, so a captured launch reuses them): partials
    [rows, H, splits, D] and their (m, l) [rows, H, splits, 2] float32, tickets [rows, kv_heads] int32
    (zero between calls)."""

    def __init__(self, rows: int, heads: int, kv_heads: int, head_dim: int, splits: int, device):
        if splits & (splits - 1) or not 1 <= splits <= MAX_SPLITS:
            raise ValueError(f"splits must be a power of two 1..{MAX_SPLITS}, got {splits}")
        self.splits = splits
        self.partial = torch.empty(rows, heads, splits, head_dim, dtype=torch.float32, device=device)
        self.stats = torch.empty(rows, heads, splits, 2, dtype=torch.float32, device=device)
        self.tickets = torch.zeros(rows, kv_heads, dtype=torch.int32, device=device)


def split_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, table: torch.Tensor,
                 lengths: torch.Tensor, sinks: torch.Tensor, window: int | None, scratch: SplitScratch,
                 out: torch.Tensor) -> torch.Tensor:
    """out [T, H, D] = attention of q [T, H, D] (bf16, rows of stride q.stride(0)) over the paged caches
    [blocks, page, kv_heads, D] through table [T, width] int32 and lengths [T] int32, with sinks [H] float32,
    in scratch.splits programs per (row, kv head)."""
    t, heads, dim = q.shape
    kv_heads, page = k_cache.shape[2], k_cache.shape[1]
    group = heads // kv_heads
    splits = scratch.splits
    if q.stride(2) != 1 or q.stride(1) != dim:
        raise ValueError("q's heads must be contiguous [H, D] rows")
    if scratch.partial.shape[0] < t or tuple(scratch.tickets.shape[1:]) != (kv_heads,):
        raise ValueError(f"scratch holds {scratch.partial.shape[0]} rows of {scratch.tickets.shape[1]} kv heads, "
                         f"the step {t} of {kv_heads}")
    if page & (page - 1) or BLOCK_N % page:
        raise ValueError(f"page size {page} must divide {BLOCK_N}")
    scale = dim**-0.5 * LOG2E
    pdl = pdl_enabled()
    merge = dict(GP=triton.next_power_of_2(group), CHUNK=min(splits, 8))  # the merge's tile (_merge_group)
    _split_kernel[(t, kv_heads, splits)](
        q, k_cache, v_cache, table, lengths, scratch.partial, scratch.stats, scratch.tickets, sinks, out,
        q.stride(0), table.stride(0), WINDOW=window or 0, SPLITS=splits, GROUP=group, HEADS=heads,
        KV_HEADS=kv_heads, HEAD_DIM=dim, PAGE=page, BLOCK_N=BLOCK_N, FRESH_KEYS=FRESH_KEYS, SCALE=scale, LOG2E_=LOG2E,
        **merge, FUSED_MERGE=FUSED_MERGE, INTERPRETED=_INTERPRETED, PDL=pdl, num_warps=4, launch_pdl=pdl,
    )
    if not FUSED_MERGE:
        _merge_kernel[(t, kv_heads)](scratch.partial, scratch.stats, sinks, out, SPLITS=splits, GROUP=group,
                                     HEADS=heads, HEAD_DIM=dim, LOG2E_=LOG2E, **merge, PDL=pdl, num_warps=4,
                                     launch_pdl=pdl)
    return out


def split_decode_reference(q, k_cache, v_cache, table, lengths, sinks, window):
    """Plain torch, one sequence at a time (host sync): softmax over [sink, keys] in float32, sink dropped."""
    t, heads, dim = q.shape
    kv_heads, page = k_cache.shape[2], k_cache.shape[1]
    out = torch.empty(t, heads, dim, dtype=q.dtype, device=q.device)
    for r, n in enumerate(lengths.view(-1).tolist()):
        start = max(0, n - window) if window else 0
        slots = torch.arange(start, n, device=q.device)
        blocks = table[r, slots // page].long()
        k = k_cache[blocks, slots % page].float().repeat_interleave(heads // kv_heads, dim=1)  # [n, H, D]
        v = v_cache[blocks, slots % page].float().repeat_interleave(heads // kv_heads, dim=1)
        s = torch.einsum("hd,nhd->hn", q[r].float(), k) * dim**-0.5
        p = torch.softmax(torch.cat([sinks.float()[:, None], s], dim=1), dim=1)[:, 1:]
        out[r] = torch.einsum("hn,nhd->hd", p, v).to(q.dtype)
    return out


if triton is not None:

    @triton.jit
    def _split_kernel(q_ptr, k_ptr, v_ptr, table_ptr, lengths_ptr, part_ptr, stats_ptr, tickets_ptr, sinks_ptr,
                      out_ptr, q_stride, table_stride, WINDOW: tl.constexpr, SPLITS: tl.constexpr,
                      GROUP: tl.constexpr, HEADS: tl.constexpr, KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                      PAGE: tl.constexpr, BLOCK_N: tl.constexpr, FRESH_KEYS: tl.constexpr, SCALE: tl.constexpr,
                      LOG2E_: tl.constexpr,
                      GP: tl.constexpr, CHUNK: tl.constexpr, FUSED_MERGE: tl.constexpr, INTERPRETED: tl.constexpr,
                      PDL: tl.constexpr):
        row = tl.program_id(0)
        kvh = tl.program_id(1)
        split = tl.program_id(2)
        length = tl.load(lengths_ptr + row)  # lengths and tables are the step's inputs, copied before its kernels
        start = 0
        if WINDOW > 0:
            start = tl.maximum(length - WINDOW, 0)
        share = tl.cdiv(tl.cdiv(length - start, SPLITS), BLOCK_N) * BLOCK_N
        lo = start + split * share
        hi = tl.minimum(lo + share, length)

        heads = tl.arange(0, 16)  # the kv head's GROUP query heads, padded to tl.dot's 16 rows
        d = tl.arange(0, HEAD_DIM)
        real = heads < GROUP
        # The first tile's keys and values load before the PDL wait, all but the newest FRESH_KEYS: earlier
        # steps wrote them, and only the kernel just before (this step's rotary + cache write, which may write
        # a prompt chunk's keys before this row's own) may still run (kernels/pdl.py). At L2 (.cg): an SM's L1
        # may hold lines of a page read before it was reused.
        slot, valid, at = _tile_rows(table_ptr, row, table_stride, kvh, lo, hi, KV_HEADS, HEAD_DIM, PAGE, BLOCK_N)
        newest = valid & (slot >= length - FRESH_KEYS)
        settled = (valid & ~newest)[:, None]
        k = tl.load(k_ptr + at[:, None] + d[None, :], mask=settled, other=0.0, cache_modifier=".cg")
        v = tl.load(v_ptr + at[:, None] + d[None, :], mask=settled, other=0.0, cache_modifier=".cg")
        if PDL:  # q and the newest key and value come from the kernel before
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        k = tl.where(newest[:, None], tl.load(k_ptr + at[:, None] + d[None, :], mask=newest[:, None], other=0.0), k)
        v = tl.where(newest[:, None], tl.load(v_ptr + at[:, None] + d[None, :], mask=newest[:, None], other=0.0), v)
        q = tl.load(q_ptr + row.to(tl.int64) * q_stride + (kvh * GROUP + heads)[:, None] * HEAD_DIM + d[None, :],
                    mask=real[:, None], other=0.0)
        if INTERPRETED:  # Triton 3.6's interpreter multiplies bf16's raw uint16 bits in tl.dot
            q = q.to(tl.float32)
        m = tl.full([16], float("-inf"), dtype=tl.float32)
        l = tl.zeros([16], dtype=tl.float32)
        acc = tl.zeros([16, HEAD_DIM], dtype=tl.float32)
        if lo < hi:  # (a split past the keys stays empty: m = -inf, l = 0)
            m, l, acc = _attend_tile(q, k, v, valid, m, l, acc, SCALE, INTERPRETED)
        t0 = lo + BLOCK_N
        while t0 < hi:  # (a while loop: Triton's CPU interpreter cannot range() over loaded bounds)
            slot, valid, at = _tile_rows(table_ptr, row, table_stride, kvh, t0, hi, KV_HEADS, HEAD_DIM, PAGE,
                                         BLOCK_N)
            k = tl.load(k_ptr + at[:, None] + d[None, :], mask=valid[:, None], other=0.0)
            v = tl.load(v_ptr + at[:, None] + d[None, :], mask=valid[:, None], other=0.0)
            m, l, acc = _attend_tile(q, k, v, valid, m, l, acc, SCALE, INTERPRETED)
            t0 += BLOCK_N
        out_row = (row * HEADS + kvh * GROUP + heads) * SPLITS + split  # [16] (padding rows masked)
        tl.store(part_ptr + out_row.to(tl.int64)[:, None] * HEAD_DIM + d[None, :], acc, mask=real[:, None])
        tl.store(stats_ptr + out_row.to(tl.int64) * 2, m, mask=real)
        tl.store(stats_ptr + out_row.to(tl.int64) * 2 + 1, l, mask=real)
        if FUSED_MERGE:
            # the last split to take the (row, kv head)'s ticket merges: the acq_rel atomic after the CTA's
            # barrier orders this program's stores before it, as a __threadfence() would
            tl.debug_barrier()
            ticket_at = tickets_ptr + row * KV_HEADS + kvh
            if tl.atomic_add(ticket_at, 1, sem="acq_rel", scope="gpu") == SPLITS - 1:
                tl.store(ticket_at, 0)  # zero again for the next call (a graph replays this kernel as captured)
                _merge_group(part_ptr, stats_ptr, sinks_ptr, out_ptr, row, kvh, SPLITS, GROUP, GP, CHUNK, HEADS,
                             HEAD_DIM, LOG2E_)

    @triton.jit
    def _tile_rows(table_ptr, row, table_stride, kvh, t0, hi, KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                   PAGE: tl.constexpr, BLOCK_N: tl.constexpr):
        """Cache slots t0..t0+BLOCK_N of `row`: (slot, valid (< hi), element offset of each slot's kv head row)."""
        slot = t0 + tl.arange(0, BLOCK_N)
        valid = slot < hi
        block = tl.load(table_ptr + row.to(tl.int64) * table_stride + slot // PAGE, mask=valid, other=0)
        return slot, valid, ((block.to(tl.int64) * PAGE + slot % PAGE) * KV_HEADS + kvh) * HEAD_DIM

    @triton.jit
    def _attend_tile(q, k, v, valid, m, l, acc, SCALE: tl.constexpr, INTERPRETED: tl.constexpr):
        """One BLOCK_N tile of keys into the running (max m, sum l, acc) of q's 16 rows (online softmax, log2)."""
        if INTERPRETED:
            k, v = k.to(tl.float32), v.to(tl.float32)
        s = tl.dot(q, tl.trans(k)) * SCALE  # [16, BLOCK_N] log2 units
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m - m_new)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        l = l * alpha + tl.sum(p, 1)
        return m_new, l, acc

    @triton.jit
    def _merge_group(part_ptr, stats_ptr, sinks_ptr, out_ptr, row, kvh, SPLITS: tl.constexpr, GROUP: tl.constexpr,
                     GP: tl.constexpr, CHUNK: tl.constexpr, HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                     LOG2E_: tl.constexpr):
        """out[row, head] for the kv head's GROUP query heads (GP: padded to a power of two) from every split's
        partial, all heads at once, CHUNK splits a load (at L2, .cg: a fused merge reads other programs' stores,
        and this SM's L1 may hold an older call's)."""
        g = tl.arange(0, GP)
        real = g < GROUP
        head = kvh * GROUP + g
        d = tl.arange(0, HEAD_DIM)
        base = (row * HEADS + head).to(tl.int64) * SPLITS  # [GP]
        at = base[:, None] + tl.arange(0, SPLITS)[None, :]  # [GP, SPLITS]
        m = tl.load(stats_ptr + at * 2, mask=real[:, None], other=float("-inf"), cache_modifier=".cg")
        l = tl.load(stats_ptr + at * 2 + 1, mask=real[:, None], other=0.0, cache_modifier=".cg")
        sink = tl.load(sinks_ptr + head, mask=real, other=0.0).to(tl.float32) * LOG2E_
        top = tl.maximum(tl.max(m, 1), sink)
        total = tl.sum(l * tl.exp2(m - top[:, None]), 1) + tl.exp2(sink - top)  # empty splits: m = -inf, weight 0
        o = tl.zeros([GP, HEAD_DIM], dtype=tl.float32)
        for c in tl.static_range(0, SPLITS, CHUNK):
            at_c = base[:, None] + (c + tl.arange(0, CHUNK))[None, :]  # [GP, CHUNK]; m re-read: no slicing in Triton
            w = tl.exp2(tl.load(stats_ptr + at_c * 2, mask=real[:, None], other=float("-inf"),
                                cache_modifier=".cg") - top[:, None])
            part = tl.load(part_ptr + at_c[:, :, None] * HEAD_DIM + d[None, None, :], mask=real[:, None, None],
                           other=0.0, cache_modifier=".cg")
            o += tl.sum(part * w[:, :, None], 1)
        o = o / total[:, None]
        tl.store(out_ptr + (row * HEADS + head).to(tl.int64)[:, None] * HEAD_DIM + d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=real[:, None])

    @triton.jit
    def _merge_kernel(part_ptr, stats_ptr, sinks_ptr, out_ptr, SPLITS: tl.constexpr, GROUP: tl.constexpr,
                      GP: tl.constexpr, CHUNK: tl.constexpr, HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                      LOG2E_: tl.constexpr, PDL: tl.constexpr):
        if PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        _merge_group(part_ptr, stats_ptr, sinks_ptr, out_ptr, tl.program_id(0), tl.program_id(1), SPLITS, GROUP,
                     GP, CHUNK, HEADS, HEAD_DIM, LOG2E_)

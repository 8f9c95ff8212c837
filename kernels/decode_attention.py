"""Decode attention with sinks through FlashInfer's XQA kernel (TensorRT-LLM's decode MHA).

A decode step brings one query token per sequence. kernels/attention.py runs it through
FlashInfer's prefill-style sink wrapper, which needs a host `plan()` per (group, window) a
step (its work split, copied to the device) and a separate merge-states kernel for the
split KV. XQA is a decode kernel: it takes a rectangular page table [seqs, pages] and the
context lengths on the device (it can split long contexts over CTAs and merge them in-kernel;
rose runs it unsplit, see `run`), adds the sink
(`exp(sink - max)` in the row sum: natural-log units, the checkpoint's raw value) and keeps
the newest `window` keys of a sliding layer (the current token included, as gpt-oss's
q_pos - k_pos < window). So a step's host work is one page table and one length per
sequence, and a layer is one kernel.

    attn = DecodeAttention(heads, kv_heads, head_dim, block_size, dtype, device)
    attn.plan(batch, keys)                       # host: page tables, lengths, cache slots
    out = attn.attend_qkv(group, window, qkv, cos, sin, k_cache, v_cache, sinks)

With graph_rows set, every buffer is fixed ([graph_rows, width] page tables, width the most
pages a sequence can hold) so a captured step reads whatever the last plan wrote; a plan
rewrites only the step's columns, and rows past the step's sequences are padding on the
group's scratch block. The cuda backend uses it for every decode step (eager and graphs)
unless ROSE_DECODE_ATTENTION=flashinfer; `tests/kernels/test_kernels_attention_gpu.py` checks
the sink and window semantics above against the torch reference.
"""

from __future__ import annotations

import os
from array import array

import torch

from kernels.attention import CacheThenAttend
from services.worker.model.batch import NO_BLOCK, ForwardBatch, HostStaging

SCRATCH_BYTES = 16 * 1024 * 1024  # XQA's partial rows of split sequences (at most one per SM)


def decode_kernel() -> str:
    """ROSE_DECODE_ATTENTION: "split" (the default: DecodeAttention with kernels/split_decode.py for every
    step), "xqa" (DecodeAttention with FlashInfer's XQA) or "flashinfer" (no DecodeAttention: FlashInfer's
    sink wrapper, as prefill).

    `python -m bench.decode_step --batches 1,8,64` on an H100 (docs/BENCHMARKS.md): the split kernel's
    replay 2.067 ms at batch 1 against XQA's 2.289 (a sequence's keys spread over the SMs, where XQA
    reads them with 8 CTAs), the same within run-to-run spread at 8 and 64; unsplit XQA against the
    wrapper 2.320 / 6.403 / 9.277 ms to 2.356 / 6.476 / 9.349, and no per-step FlashInfer plan on the host.
    """
    choice = os.environ.get("ROSE_DECODE_ATTENTION", "split")
    if choice not in ("flashinfer", "xqa", "split"):
        raise ValueError(f"ROSE_DECODE_ATTENTION must be xqa, split or flashinfer, got {choice!r}")
    return choice


def uses_decode_attention() -> bool:
    """Whether the cuda backend's decode steps go through DecodeAttention (XQA or the split kernel)."""
    return decode_kernel() != "flashinfer"


def page_table(batch: ForwardBatch, group: str, block_size: int, scratch_block: int,
               rows: int | None = None) -> tuple[array, array, int]:
    """(pages [rows x width] int32 row-major, lengths [rows] int32, width) of one group for XQA.

    width is the step's most pages a sequence. A row lists the sequence's pages in order;
    slots past its pages, a sliding table's leading NO_BLOCKs (blocks out of every window:
    XQA skips their tiles) and rows past the step's sequences (length 1: CUDA-graph padding)
    hold `scratch_block`, a block the engine never hands out.
    """
    tables = batch.block_tables[group]
    pages = [(ctx + block_size - 1) // block_size for ctx in batch.context_lens]
    width = max(pages, default=1)
    rows = batch.num_seqs if rows is None else rows
    if batch.num_seqs > rows:
        raise ValueError(f"a step of {batch.num_seqs} sequences does not fit {rows} rows")
    # once a step for every page of every sequence (64 x 8192 tokens: 32768 a group): array-to-array
    # copies for the padding and fromlist for the pages, the fastest conversions of the list a table is
    pad = array("i", [scratch_block]) * width
    flat = array("i")
    for s, (table, n) in enumerate(zip(tables, pages)):
        row = table[:n]
        lead = row.count(NO_BLOCK) if row and row[0] == NO_BLOCK else 0
        if lead:
            row = row[lead:]
            flat.extend(pad[:lead])
        if NO_BLOCK in row:
            raise ValueError(f"{group} block table of sequence {s} has a NO_BLOCK hole inside its keys")
        flat.fromlist(row)
        flat.extend(pad[: width - n])
    for _ in range(rows - batch.num_seqs):
        flat.extend(pad)
    lengths = array("i", batch.context_lens)
    lengths.extend([1] * (rows - batch.num_seqs))
    return flat, lengths, width


class DecodeAttention(CacheThenAttend):
    """XQA decode attention for one-token-per-sequence steps (see the module docstring).

    Same calls as kernels/attention.py's SinkAttention (plan, and CacheThenAttend's attend_qkv and
    __call__ around its own run), for decode steps only. graph_rows / widths[group]: the fixed
    buffers of a CUDA-graph bucket (widths: the most pages a sequence may list). buffers, shared
    between instances that never run at once: the semaphores, XQA's split scratch and the split
    kernel's partials. split: kernels/split_decode.py instead of XQA (default: ROSE_DECODE_ATTENTION,
    read once here; graph instances take the eager instance's choice).
    """

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype,
                 device: torch.device | str, graph_rows: int | None = None, widths: dict[str, int] | None = None,
                 buffers: dict | None = None, split: bool | None = None):
        from kernels.attention import missing_attention_packages

        missing = missing_attention_packages()
        if missing:
            raise ImportError(f"XQA decode attention needs {', '.join(missing)}: pip install -e .[gpu]")
        if num_heads % num_kv_heads:
            raise ValueError(f"{num_heads} heads do not group over {num_kv_heads} kv heads")
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.block_size, self.dtype = block_size, dtype
        self.device = torch.device(device)
        self.graph_rows = graph_rows
        self.split = decode_kernel() == "split" if split is None else split  # the split kernel, not XQA
        self.buffers = {} if buffers is None else buffers
        self.tables: dict[str, torch.Tensor] = {}  # group -> [rows, width] int32
        self.lengths: dict[str, torch.Tensor] = {}  # group -> [rows, 1] uint32 (int32 bits)
        self.slots: dict[str, torch.Tensor] = {}  # group -> [rows] int64: each new token's cache slot
        self.staging: HostStaging | None = None
        if graph_rows is not None:
            for group, width in (widths or {}).items():
                self.tables[group] = torch.zeros(graph_rows, width, dtype=torch.int32, device=self.device)
                self.lengths[group] = torch.ones(graph_rows, 1, dtype=torch.int32, device=self.device)
                self.slots[group] = torch.zeros(graph_rows, dtype=torch.int64, device=self.device)

    def _buffer(self, name, make):
        if name not in self.buffers:
            self.buffers[name] = make()
        return self.buffers[name]

    def plan(self, batch: ForwardBatch, keys, scratch_blocks: dict[str, int] | None = None) -> None:
        """Page tables, context lengths and cache slots of this decode step for every group in keys (host, once a step).

        Every copy goes from pinned memory, queued behind the step in flight.
        """
        from kernels.attention import write_slots

        if any(q != 1 for q in batch.query_lens):
            raise ValueError("XQA decode attention takes one new token per sequence")
        rows = self.graph_rows or batch.num_seqs  # page_table refuses a step past the graph's rows
        scratch = scratch_blocks or {}
        if self.staging is None:
            self.staging = HostStaging()
        self.staging.begin()
        for group in dict.fromkeys(g for g, _ in keys):
            block = scratch.get(group, 0)
            flat, lengths, width = page_table(batch, group, self.block_size, block, rows=rows)
            slots = write_slots(batch, group, self.block_size)
            pad = torch.full((rows - len(slots),), block * self.block_size, dtype=torch.int64)
            table = self.staging.put(torch.frombuffer(flat, dtype=torch.int32).view(rows, width))
            table = table.to(self.device, non_blocking=True)
            host_lengths = self.staging.put(torch.frombuffer(lengths, dtype=torch.int32).view(rows, 1))
            host_slots = self.staging.put(torch.cat([slots, pad]))
            if self.graph_rows is None:
                self.tables[group] = table
                self.lengths[group] = host_lengths.to(self.device, non_blocking=True)
                self.slots[group] = host_slots.to(self.device, non_blocking=True)
            else:  # the step's columns only: a row's later pages are never read (its length stops before them)
                if width > self.tables[group].shape[1]:
                    raise ValueError(f"{group}: {width} pages a sequence past the graph table's "
                                     f"{self.tables[group].shape[1]}")
                self.tables[group][:, :width].copy_(table)
                self.lengths[group].copy_(host_lengths, non_blocking=True)
                self.slots[group].copy_(host_slots, non_blocking=True)
        self.staging.end()

    def run(self, group: str, window: int | None, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
            sinks: torch.Tensor) -> torch.Tensor:
        """Attention only (cache already written). q [T, heads, D] with T the plan's rows -> [T, heads, D]."""
        from flashinfer import xqa

        t = q.shape[0]
        table, lengths = self.tables[group], self.lengths[group]
        if t != table.shape[0]:
            raise ValueError(f"{t} query rows for a plan of {table.shape[0]}")
        out = torch.empty(t, 1, self.num_heads, self.head_dim, dtype=self.dtype, device=q.device)
        if self.split:
            return self._split(group, window, q, k_cache, v_cache, sinks, out.view(t, self.num_heads, self.head_dim))
        # one buffer per size class (256 rows covers every graph bucket); a graph keeps the pointer, so
        # a larger eager step gets a buffer of its own instead of replacing the one graphs read
        rows = max(256, 1 << (t - 1).bit_length())
        semaphores = self._buffer(("semaphores", rows), lambda: torch.zeros(
            _semaphores(self.num_kv_heads, rows), dtype=torch.int32, device=q.device))
        scratch = self._buffer("scratch", lambda: torch.zeros(SCRATCH_BYTES, dtype=torch.uint8, device=q.device))
        group_sinks = sinks.float().view(self.num_kv_heads, self.num_heads // self.num_kv_heads)

        # sm_count=1: one CTA per (sequence, kv head), no multi-block split. With the split (XQA's
        # default, SMs / (sequences x kv heads) CTAs each) the graph-vs-eager test failed on the H100
        # at bucket 4 with 3 sequences (7.4e-02 to 1.2e-01; zeroing the semaphores first did not help);
        # without it the graphs matched eager exactly and the batch-1 replay was 2.320 ms (split: 2.285).
        xqa(q.to(self.dtype).view(t, 1, self.num_heads, self.head_dim), k_cache, v_cache, table,
            lengths.view(torch.uint32), out, scratch, semaphores.view(torch.uint32), self.num_kv_heads,
            self.block_size, sinks=group_sinks, sliding_win_size=window or 0, kv_layout="NHD", sm_count=1)
        return out.view(t, self.num_heads, self.head_dim)

    def _split(self, group, window, q, k_cache, v_cache, sinks, out):
        """run() through kernels/split_decode.py: its partials in fixed buffers per row count (graphs keep them)."""
        from kernels.device import sm_count
        from kernels.split_decode import SplitScratch, split_decode, splits_for

        t = q.shape[0]
        # split by the rows of t's graph bucket (a power of two): an eager step then sums each row exactly as the
        # bucket's graph does, so graph and eager steps agree to the bit
        bucket = 1 << (t - 1).bit_length()
        splits = int(os.environ.get("ROSE_DECODE_SPLITS", "0")) or splits_for(bucket, self.num_kv_heads,
                                                                            sm_count(q.device))
        scratch = self._buffer(("split", t), lambda: SplitScratch(t, self.num_heads, self.num_kv_heads,
                                                                    self.head_dim, splits, q.device))
        return split_decode(q.to(self.dtype), k_cache, v_cache, self.tables[group], self.lengths[group].view(-1),
                            sinks.float(), window, scratch, out)


def _semaphores(num_kv_heads: int, rows: int) -> int:
    """XQA's semaphore count for rows sequences (FlashInfer's test sizing, one more pair of slack)."""
    seqs = num_kv_heads * rows
    return (seqs + 1) // 2 * 2 + 2 + seqs + 2

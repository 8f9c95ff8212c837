"""Paged attention with per-head sinks and sliding windows through FlashInfer.

gpt-oss's sink is one extra logit per query head in the softmax denominator, with no
value. FlashInfer's plain paged wrapper ignores `sinks`; the sink is an attention
*variant* compiled in, so this uses `flashinfer.BatchAttentionWithAttentionSinkWrapper`
(its kernel adds `exp(sink)` to the row sum, the sink in natural-log units: the raw
checkpoint value, not scaled by sm_scale). One wrapper per (group, window): a sliding
one is built with `window_left = window - 1` (FlashInfer keeps keys with
q_pos - k_pos <= window_left; gpt-oss keeps q_pos - k_pos < window).

The torch reference is the model's own `paged_attention`
(services/worker/model/paged_attention.py).
"""

from __future__ import annotations

import importlib.util
import os
from array import array
from itertools import accumulate, chain

import torch

from services.worker.model.batch import NO_BLOCK, ForwardBatch, HostStaging

WORKSPACE_BYTES = 256 * 1024 * 1024


def missing_attention_packages() -> list[str]:
    return [] if importlib.util.find_spec("flashinfer") else ["flashinfer-python"]


def prefill_backend() -> str:
    """ROSE_PREFILL_ATTENTION: FlashInfer's kernel family for the cuda backend's steps through the prefill
    wrapper: fa2, fa3 (Hopper's warp-specialised kernels, same sink variant) or auto (default): on Hopper
    fa3 for steps of prompt chunks only, fa2 where decode rows ride along (fa3 ran a step of 63 decode rows
    at 8192 tokens beside a chunk 1.7x slower; docs/GPU.md). prefill_families applies it to a GPU."""
    choice = os.environ.get("ROSE_PREFILL_ATTENTION", "auto")
    if choice not in ("fa2", "fa3", "auto"):
        raise ValueError(f"ROSE_PREFILL_ATTENTION={choice!r}: fa2, fa3 or auto")
    return choice


def prefill_families(capability: tuple[int, int]) -> tuple[str, str]:
    """(family for steps with decode rows, family for steps of prompt chunks only) on a GPU of this compute
    capability. FlashInfer's fa3 kernels are Hopper's (sm90) alone: elsewhere auto is fa2 throughout, and
    an explicit fa3 is refused."""
    choice = prefill_backend()
    hopper = capability[0] == 9
    if choice == "fa3" and not hopper:
        raise ValueError(f"ROSE_PREFILL_ATTENTION=fa3 needs a Hopper GPU (sm90), not sm{capability[0]}{capability[1]}")
    if choice == "auto":
        return "fa2", "fa3" if hopper else "fa2"
    return choice, choice


def write_slots(batch: ForwardBatch, group: str, block_size: int) -> torch.Tensor:
    """Flat cache slot (block * block_size + offset) of every new token: [T] int64 (CPU)."""
    slots = array("q")
    for s, (q_len, ctx) in enumerate(zip(batch.query_lens, batch.context_lens)):
        table = batch.block_tables[group][s]
        for pos in range(ctx - q_len, ctx):
            block = table[pos // block_size]
            if block == NO_BLOCK:
                raise ValueError(f"{group} block table of sequence {s} has NO_BLOCK where a new token is written")
            slots.append(block * block_size + pos % block_size)
    return _as_tensor(slots, torch.int64)


def page_metadata(
    batch: ForwardBatch, group: str, block_size: int, pad_to: int | None = None, scratch_block: int = 0
) -> tuple[torch.Tensor, ...]:
    """FlashInfer paging for one group: (qo_indptr, kv_indptr, kv_indices, last_page_len), int32 CPU.

    Leading NO_BLOCK entries of a sliding table (blocks wholly out of every new token's
    window) are skipped: FlashInfer's causal and window masks count from the end of the
    keys, so dropping whole leading blocks only drops keys no query may see.
    pad_to appends one-token sequences on `scratch_block` up to that many sequences (the
    padding rows of a CUDA graph captured for a larger batch).
    """
    tables = batch.block_tables[group]
    pages = [(ctx + block_size - 1) // block_size for ctx in batch.context_lens]
    flat: list[int] = []
    lens = []
    for table, n in zip(tables, pages):
        if len(table) > n:
            table = table[:n]
        if table and table[0] == NO_BLOCK:  # only sliding tables lead with NO_BLOCK: skip the run
            table = table[table.count(NO_BLOCK):]  # a NO_BLOCK left after this is a hole, found below
        flat += table
        lens.append(len(table))
    # one conversion of the page list (a step at batch 256 lists tens of thousands of pages)
    pad = max(0, (pad_to or 0) - batch.num_seqs)
    indices = array("i", flat)
    # a list scan is cheaper for a few pages, a tensor compare for tens of thousands
    if (NO_BLOCK in flat) if len(flat) < 4096 else bool(_as_tensor(indices, torch.int32).eq(NO_BLOCK).any()):
        hole = next(s for s, (t, n) in enumerate(zip(tables, pages)) if _has_hole(t[:n]))
        raise ValueError(f"{group} block table of sequence {hole} has a NO_BLOCK hole inside its keys")
    indices.extend([scratch_block] * pad)
    kv_indptr = array("i", accumulate(chain(lens, [1] * pad), initial=0))
    qo = array("i", accumulate(chain(batch.query_lens, [1] * pad), initial=0))
    last = array("i", [ctx - (n - 1) * block_size for ctx, n in zip(batch.context_lens, pages)] + [1] * pad)
    return tuple(_as_tensor(a, torch.int32) for a in (qo, kv_indptr, indices, last))


def _has_hole(table: list[int]) -> bool:
    """Whether a NO_BLOCK follows a real block (NO_BLOCKs may only lead)."""
    return NO_BLOCK in table[table.count(NO_BLOCK):]


def _as_tensor(values: array, dtype: torch.dtype) -> torch.Tensor:
    """A CPU tensor over the array's buffer (no per-element conversion); the tensor keeps it alive."""
    if not values:
        return torch.zeros(0, dtype=dtype)
    return torch.frombuffer(values, dtype=dtype)


class CacheThenAttend:
    """What both attentions here do around their `run`: write the step's new k/v at `self.slots[group]`
    (the plan's cache slots, one per query row), then attend. Subclasses set num_heads,
    num_kv_heads, head_dim, slots and define run(group, window, q, k_cache, v_cache, sinks)."""

    def __call__(
        self, group: str, window: int | None, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
        k_cache: torch.Tensor, v_cache: torch.Tensor, sinks: torch.Tensor,
    ) -> torch.Tensor:
        """Write k/v into the cache, then attend. q [T, heads, D], k/v [T, kv_heads, D] -> [T, heads, D]."""
        slots = self.slots[group]
        k_cache.view(-1, self.num_kv_heads, self.head_dim)[slots] = k.to(k_cache.dtype)
        v_cache.view(-1, self.num_kv_heads, self.head_dim)[slots] = v.to(v_cache.dtype)
        return self.run(group, window, q, k_cache, v_cache, sinks)

    def attend_qkv(
        self, group: str, window: int | None, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
        k_cache: torch.Tensor, v_cache: torch.Tensor, sinks: torch.Tensor,
    ) -> torch.Tensor:
        """From the QKV projection: rotary + cache write in one kernel (kernels/rope_cache.py), then attend.

        qkv [T, (heads + 2 kv_heads) * D] bf16, cos/sin [T, D/2] float32 -> [T, heads, D].
        """
        from kernels.rope_cache import rope_and_cache

        q = rope_and_cache(qkv, cos, sin, self.slots[group], k_cache, v_cache, self.num_heads, self.num_kv_heads,
                           self.head_dim)
        return self.run(group, window, q, k_cache, v_cache, sinks)

    def attend_x(
        self, group: str, window: int | None, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
        cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, sinks: torch.Tensor,
    ) -> torch.Tensor:
        """From the QKV projection's input, for a few rows: the projection, rotary and cache write in one GEMV
        (kernels/qkv_rope.py), then attend. x [T, hidden] bf16, weight [(heads + 2 kv_heads) * D, hidden]
        -> [T, heads, D]."""
        from kernels.qkv_rope import qkv_rope_cache

        q = qkv_rope_cache(x, weight, bias, cos, sin, self.slots[group], k_cache, v_cache, self.num_heads,
                           self.num_kv_heads, self.head_dim)
        return self.run(group, window, q, k_cache, v_cache, sinks)


class SinkAttention(CacheThenAttend):
    """Plans once per step, then runs every layer of the step through FlashInfer.

    One FlashInfer wrapper per (group, window) pair, made at first use: window None is
    full attention; a window of w keeps the w newest keys (FlashInfer window_left w - 1).

    With graph_batch set, the wrappers run in FlashInfer's CUDA-graph mode for exactly
    that many one-token sequences: page metadata and cache slots go into fixed device
    buffers that a captured step reads, and plan() pads a smaller batch with one-token
    sequences on the group's scratch block. max_pages[group] bounds the pages of a step
    (the pool size); workspaces, shared between instances that never run at once, holds
    one float workspace per (group, window).
    """

    def __init__(
        self,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device | str,
        backend: str = "fa2",
        graph_batch: int | None = None,
        max_pages: dict[str, int] | None = None,
        workspaces: dict | None = None,
    ):
        missing = missing_attention_packages()
        if missing:
            raise ImportError(f"FlashInfer attention needs {', '.join(missing)}: pip install -e .[gpu]")
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.block_size, self.dtype, self.backend = block_size, dtype, backend
        self.scale = head_dim**-0.5
        self.device = torch.device(device)
        self.graph_batch, self.max_pages = graph_batch, max_pages or {}
        self.workspaces = {} if workspaces is None else workspaces
        self.wrappers: dict[tuple[str, int | None], object] = {}
        self.slots: dict[str, torch.Tensor] = {}
        self.staging: HostStaging | None = None  # pinned host memory for the plan's copies (made at first plan)
        if graph_batch is not None:
            self.slots = {g: torch.zeros(graph_batch, dtype=torch.int64, device=self.device) for g in self.max_pages}

    def _wrapper(self, group: str, window: int | None):
        key = (group, window)
        if key not in self.wrappers:
            import flashinfer

            # each wrapper keeps plan state in its workspace: one buffer per (group, window)
            if key not in self.workspaces:
                self.workspaces[key] = torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=self.device)
            graph = {}
            if self.graph_batch is not None:
                i32 = lambda n: torch.zeros(n, dtype=torch.int32, device=self.device)  # noqa: E731
                b = self.graph_batch
                graph = dict(use_cuda_graph=True, qo_indptr_buf=i32(b + 1), paged_kv_indptr_buf=i32(b + 1),
                             paged_kv_indices_buf=i32(self.max_pages[group] + b), paged_kv_last_page_len_buf=i32(b))
            self.wrappers[key] = flashinfer.BatchAttentionWithAttentionSinkWrapper(
                self.workspaces[key], kv_layout="NHD", backend=self.backend, q_data_type=self.dtype,
                kv_data_type=self.dtype, head_dim_qk=self.head_dim, head_dim_vo=self.head_dim,
                window_left=_window_left(window), **graph,
            )
        return self.wrappers[key]

    def plan(self, batch: ForwardBatch, keys, scratch_blocks: dict[str, int] | None = None) -> None:
        """Page metadata and cache slots of this step for every (group, window) in keys (host work, once a step).

        scratch_blocks[group]: the block padding rows use (graph mode only).
        """
        pad_to = self.graph_batch
        if pad_to is not None and (batch.num_seqs > pad_to or any(q != 1 for q in batch.query_lens)):
            raise ValueError(f"a graph-mode plan takes up to {pad_to} one-token sequences")
        scratch = scratch_blocks or {}
        # Everything goes to the device from pinned memory, queued behind the step in flight (the
        # engine plans a step ahead). FlashInfer's own plan buffer is pinned too; beginning the
        # staging waits until the last plan's copies, its own included, ran. FlashInfer's page
        # metadata is pinned tensor by tensor: views of the staging buffer (with seq_lens) failed
        # the GPU logits test (docs/BENCHMARKS.md, the 24-layer serving run after the overlap).
        if self.staging is None:
            self.staging = HostStaging()
        self.staging.begin()
        for group, window in keys:
            meta = page_metadata(batch, group, self.block_size, pad_to, scratch.get(group, 0))
            qo, kv_indptr, indices, last = (t.pin_memory() for t in meta)
            if pad_to is not None:  # FlashInfer copies host page indices into its graph buffer blocking
                indices = indices.to(self.device, non_blocking=True)
            self._wrapper(group, window).plan(
                qo, kv_indptr, indices, last, self.num_heads, self.num_kv_heads, self.head_dim, self.block_size,
                causal=True, sm_scale=self.scale, window_left=_window_left(window),
                q_data_type=self.dtype, kv_data_type=self.dtype,
            )
        for group in {g for g, _ in keys}:
            slots = write_slots(batch, group, self.block_size)
            if pad_to is None:
                self.slots[group] = self.staging.put(slots).to(self.device, non_blocking=True)
            else:
                padding = torch.full((pad_to - len(slots),), scratch.get(group, 0) * self.block_size)
                self.slots[group].copy_(self.staging.put(torch.cat([slots, padding])), non_blocking=True)
        self.staging.end()

    def run(self, group: str, window: int | None, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
            sinks: torch.Tensor) -> torch.Tensor:
        """Attention only (cache already written). q [T, heads, D] -> [T, heads, D] in q's dtype."""
        return self.wrappers[(group, window)].run(q.to(self.dtype), (k_cache, v_cache), sinks.float(), self.scale)


def _window_left(window: int | None) -> int:
    return -1 if window is None else window - 1

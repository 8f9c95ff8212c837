"""What the engine hands a backend for one step, and the paged KV cache it writes.

The KV cache has one block pool per attention group: "full" for full-attention
layers and "sliding" for sliding-window layers, so window layers can drop blocks
that fell out of their window while full layers keep them. A sequence has one
block table per group; both cover the same token positions, block `i` holding
positions [i*block_size, (i+1)*block_size). A sliding table may hold NO_BLOCK for
blocks wholly older than the window.

Layout per layer (FlashInfer's NHD paged layout): k and v are each
[num_blocks, block_size, num_kv_heads, head_dim] in the cache dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

NO_BLOCK = -1
GROUPS = ("full", "sliding")


@dataclass
class ForwardBatch:
    """One engine step: the new tokens of several sequences, concatenated.

    token_ids, positions: [T] int64, sequence by sequence (token_ids on the CPU, or on the
        model's device when the engine feeds it the last step's draws).
    query_lens[s]: new tokens of sequence s this step (sum == T).
    context_lens[s]: tokens of sequence s in the cache after this step
        (cached before + query_lens[s]); the new tokens sit at the end.
    block_tables[group][s]: block ids of sequence s for that group, covering
        positions [0, context_lens[s]).
    Logits are returned for the last new token of each sequence.
    """

    token_ids: torch.Tensor
    positions: torch.Tensor
    query_lens: list[int]
    context_lens: list[int]
    block_tables: dict[str, list[list[int]]]

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens)


@dataclass
class PagedKVCache:
    """Per-layer k/v block tensors; layer i lives in the pool of layer_groups[i]."""

    k: list[torch.Tensor]  # per layer [num_blocks(group), block_size, kv_heads, head_dim]
    v: list[torch.Tensor]
    layer_groups: list[str]  # "full" or "sliding" per layer
    block_size: int
    # per pool, a block past those the engine hands out (the cuda backend's CUDA-graph padding rows use it)
    scratch_blocks: dict[str, int] | None = None

    @classmethod
    def allocate(
        cls,
        layer_groups: list[str],
        num_blocks: dict[str, int],
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> "PagedKVCache":
        shape = lambda g: (num_blocks[g], block_size, num_kv_heads, head_dim)  # noqa: E731
        k = [torch.zeros(shape(g), dtype=dtype, device=device) for g in layer_groups]
        v = [torch.zeros(shape(g), dtype=dtype, device=device) for g in layer_groups]
        return cls(k=k, v=v, layer_groups=list(layer_groups), block_size=block_size)


def to_device(values: torch.Tensor | list, device: torch.device | str, dtype: torch.dtype | None = None) -> torch.Tensor:
    """values (a CPU tensor, or a list) on device, queued on the current stream without waiting for it.

    A copy from pageable host memory may wait for the stream to drain, and a blocking copy
    always does: with the engine a step ahead, that stalls the host until the step in flight
    ends. Pinned memory's copy is queued like a kernel (torch keeps the block until it ran).
    """
    t = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype)
    if torch.device(device).type != "cuda" or not t.is_cpu:
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


class HostStaging:
    """A pinned host buffer for a step's small inputs, reused step after step.

        staging.begin()                   # waits until the last round's copies ran
        pinned = staging.put(cpu_tensor)  # a pinned copy, as often as needed
        device_buffer.copy_(pinned, non_blocking=True)
        staging.end()                     # marks where this round's copies sit in the stream

    Pinning each tensor on its own costs tens of microseconds a call; writing into one
    pinned buffer costs a memcpy. The buffer must not change under a queued copy, hence
    begin() waits for the event end() recorded (queued behind the step in flight, it
    has usually run by then).
    """

    def __init__(self, nbytes: int = 1 << 16):
        self.buffer = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        self.used = 0
        self.done: torch.cuda.Event | None = None

    def begin(self) -> None:
        if self.done is not None:
            self.done.synchronize()
        self.used = 0

    def put(self, t: torch.Tensor) -> torch.Tensor:
        nbytes = t.numel() * t.element_size()
        if self.used + nbytes > self.buffer.numel():
            # the old buffer stays with the caching host allocator until its queued copies ran
            self.buffer = torch.empty(max(2 * self.buffer.numel(), nbytes), dtype=torch.uint8, pin_memory=True)
            self.used = 0
        view = self.buffer[self.used : self.used + nbytes].view(t.dtype).view(t.shape)
        view.copy_(t)
        self.used += -(-nbytes // 8) * 8  # the next view 8-byte aligned
        return view

    def end(self) -> None:
        self.done = torch.cuda.Event()
        self.done.record()


def check_forward_inputs(batch: ForwardBatch, kv: PagedKVCache, layer_groups: list[str], vocab_size: int) -> None:
    """ValueError naming what is inconsistent between a batch, its cache and the model."""
    if kv.layer_groups != layer_groups:
        raise ValueError(f"KV cache groups {kv.layer_groups} do not match the model's {layer_groups}")
    if batch.num_seqs == 0:
        raise ValueError("ForwardBatch holds no sequence")
    if len(batch.context_lens) != batch.num_seqs:
        raise ValueError(f"{batch.num_seqs} query_lens but {len(batch.context_lens)} context_lens")
    if batch.token_ids.dim() != 1 or batch.positions.shape != batch.token_ids.shape:
        raise ValueError(f"token_ids {tuple(batch.token_ids.shape)} and positions {tuple(batch.positions.shape)} "
                         "must both be [T]")
    # ids already on the device come from the sampler (engine overlap): checking them would wait for it
    if batch.token_ids.is_cpu and batch.token_ids.numel() and (
            int(batch.token_ids.min()) < 0 or int(batch.token_ids.max()) >= vocab_size):
        raise ValueError(f"token ids must lie in [0, {vocab_size})")

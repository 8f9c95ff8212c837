"""How many KV blocks each attention group gets when num_kv_blocks is 0 (auto).

Wanted: room for max_num_seqs sequences of max_model_len in the full group, and in
the sliding group room for every sequence's window plus one prefill chunk. That is
then bounded by memory: on CUDA a share of what is free after the weights loaded,
on CPU a fixed cap (the embedded run shares the host with everything else).
"""

from __future__ import annotations

import logging
import math
import os

import torch

log = logging.getLogger(__name__)

# torch.zeros touches every page, so the CPU cache is resident from the start: keep it modest.
CPU_KV_CAP_BYTES = 256 << 20
CUDA_FREE_FRACTION = 0.85  # the rest stays for activations and the allocator's slack


def block_bytes(model, group: str, block_size: int) -> int:
    """Bytes of one block of this group, over all its layers, k and v."""
    c = model.config
    layers = sum(1 for g in c.layer_groups if g == group)
    itemsize = torch.empty((), dtype=model.dtype).element_size()
    return layers * 2 * block_size * c.num_key_value_heads * c.head_dim * itemsize


def memory_budget(device: torch.device) -> int:
    """Bytes the KV cache may take on this device."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * CUDA_FREE_FRACTION)
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        ram = 8 * CPU_KV_CAP_BYTES
    return min(CPU_KV_CAP_BYTES, ram // 8)


def kv_blocks_per_group(model, settings, max_model_len: int) -> dict[str, int]:
    """Blocks per group: settings.num_kv_blocks if set, else sized as the module says."""
    groups = list(dict.fromkeys(model.config.layer_groups))
    if settings.num_kv_blocks > 0:
        return {g: settings.num_kv_blocks for g in groups}
    bs = settings.block_size
    per_seq = math.ceil(max_model_len / bs)
    window = model.config.max_window
    wanted = {"full": settings.max_num_seqs * per_seq}
    least = {"full": per_seq}
    sliding_per_seq = min(per_seq, math.ceil((window + 1) / bs) + 1)
    wanted["sliding"] = min(
        settings.max_num_seqs * per_seq,
        settings.max_num_seqs * sliding_per_seq + math.ceil(settings.max_num_batched_tokens / bs),
    )
    least["sliding"] = sliding_per_seq
    sizes = {g: block_bytes(model, g, bs) for g in groups}
    budget = memory_budget(model.device)
    total = sum(wanted[g] * sizes[g] for g in groups)
    if total <= budget:
        return {g: wanted[g] for g in groups}
    needed = sum(least[g] * sizes[g] for g in groups)
    if needed > budget:
        raise ValueError(
            f"one sequence of max_model_len {max_model_len} needs {needed / 2**20:.0f} MiB of KV cache but "
            f"{budget / 2**20:.0f} MiB are available; lower --max-model-len or set --num-kv-blocks")
    # The sliding group's want is small (windows, not contexts): serve it first, then
    # give the rest to the full group, which is what bounds concurrency at long context.
    full_size, sliding_size = sizes.get("full", 0), sizes.get("sliding", 0)
    blocks = {}
    if "sliding" in sizes:
        room = (budget - least.get("full", 0) * full_size) // sliding_size if "full" in sizes else budget // sliding_size
        blocks["sliding"] = max(least["sliding"], min(wanted["sliding"], room))
    if "full" in sizes:
        blocks["full"] = max(least["full"], (budget - blocks.get("sliding", 0) * sliding_size) // full_size)
    log.info("KV cache bounded by memory: %s blocks of %d tokens", blocks, bs)
    return blocks

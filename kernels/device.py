"""Facts about the CUDA device that kernels size their launches by (cached: one query per device)."""

from __future__ import annotations

import functools

import torch


@functools.cache
def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors on `device` (persistent grids and split counts are multiples of it)."""
    return torch.cuda.get_device_properties(device).multi_processor_count

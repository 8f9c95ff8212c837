"""Programmatic dependent launch (PDL, Hopper and later): a kernel starts while the one before it ends.

A batch-1 decode step is some 380 kernels of a few microseconds each; without PDL each one
launches only after the last CTA of the one before it has finished and flushed, and then
pays its own start-up (CTA launch, argument loads, the first global loads' latency) with the
GPU idle. Launched with PDL, the next kernel's CTAs are placed as soon as every CTA of the
running kernel has signalled `griddepcontrol.launch_dependents`, and they run up to their
`griddepcontrol.wait`, which returns once the kernel before has completed and its writes
are visible.

The contract every rose kernel launched with PDL keeps (a kernel that breaks it races):
  - before its wait it reads only what no kernel of the step writes (weights, biases,
    norm weights), and writes nothing;
  - every CTA executes the wait (a grid whose CTAs all skipped it would complete early, and
    the kernel after it could pass its own wait before the one before finished);
  - it signals launch_dependents after its wait, so at most one kernel is launched ahead.
Kernels that are not PDL-launched (cuBLAS, torch's own) simply start after the one before
ends; FlashInfer launches its kernels with PDL itself on Hopper.

ROSE_PDL=0 turns it off (for A/B timing: `bench.decode_step` prints which it ran).
"""

from __future__ import annotations

import functools
import os

import torch


@functools.cache
def pdl_enabled() -> bool:
    """Whether kernels launch with PDL: a CUDA device of compute capability 9.0+, and ROSE_PDL is not 0."""
    if os.environ.get("ROSE_PDL", "1") == "0" or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability() >= (9, 0)

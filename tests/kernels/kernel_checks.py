"""Helpers shared by the kernel tests: relative error and NaN-poisoned outputs.

tests/kernels has no __init__.py on purpose: as a package it would be imported as
`kernels` and shadow the top-level `kernels` package under pytest's prepend import mode.
"""

import torch


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; inf when out holds a NaN (an unwritten poisoned element)."""
    out, ref = out.double(), ref.double()
    if torch.isnan(out).any():
        return float("inf")
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def poisoned(*shape, dtype=torch.bfloat16, device="cuda") -> torch.Tensor:
    """An output buffer full of NaN (or -1 for integers), so an unwritten element shows."""
    if dtype.is_floating_point:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.full(shape, -1, dtype=dtype, device=device)

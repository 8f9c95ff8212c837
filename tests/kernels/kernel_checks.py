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


def run_in_triton_interpreter(source: str, timeout: int) -> None:
    """Run `source` in a child Python under TRITON_INTERPRET=1 (chosen when Triton is imported, and
    this process may hold a compiled-mode Triton) with a fresh SEED; it must print "ok" last."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    seed = int.from_bytes(os.urandom(4), "little")
    env = dict(os.environ, TRITON_INTERPRET="1", SEED=str(seed), PYTHONPATH=root)
    done = subprocess.run([sys.executable, "-c", source], env=env, cwd=root, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), f"seed {seed}\n{done.stdout}\n{done.stderr}"

"""The dense few-row GEMV run by Triton's CPU interpreter on small shapes (in a child process:
the interpreter is chosen when Triton is imported). The GPU test covers the real shapes."""

import textwrap

import pytest
from kernel_checks import run_in_triton_interpreter

pytest.importorskip("triton", reason="Triton has wheels for Linux only (the test extra installs it there)")

CASES = textwrap.dedent(
    """
    import os, torch
    from kernels.gemv import GemvConfig, gemv, gemv_reference

    torch.manual_seed(int(os.environ["SEED"]))
    for rows, n, k, config, bias in [
        (1, 10, 96, GemvConfig(4, 32, 1), True),    # N wraps, K tail
        (3, 8, 64, GemvConfig(2, 64, 2), False),    # one K step, no bias
        (4, 5, 100, GemvConfig(4, 32, 1), True),    # every row slot, K tail
        (2, 16, 128, GemvConfig(8, 32, 4), True),   # even K, several steps
    ]:
        x = torch.randn(rows, k).to(torch.bfloat16)
        w = torch.randn(n, k).to(torch.bfloat16)
        b = torch.randn(n).to(torch.bfloat16) if bias else None
        out = torch.full((rows, n), float("nan"), dtype=torch.bfloat16)
        gemv(x, w, b, out=out, config=config)
        ref = gemv_reference(x, w, b).double()
        assert not out.isnan().any(), (rows, n, k, "unwritten outputs")
        err = float((out.double() - ref).norm() / ref.norm())
        assert err <= 1e-2, (rows, n, k, err)
    print("ok")
    """
)


def test_gemv_in_triton_interpreter():
    run_in_triton_interpreter(CASES, timeout=120)

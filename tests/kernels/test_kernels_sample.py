"""The Gumbel-max draw (kernels/sample.py) in Triton's CPU interpreter, in a child process.

The interpreter is chosen when Triton is imported, so the checks run where this process's
Triton (maybe compiled mode) is not loaded. The GPU test runs the same checks compiled.
"""

import textwrap

import pytest
from kernel_checks import run_in_triton_interpreter

pytest.importorskip("triton", reason="Triton has wheels for Linux only (the test extra installs it there)")

CASES = textwrap.dedent(
    """
    import os, sys, torch
    sys.path.insert(0, "tests/kernels")
    from sample_cases import check_distribution, check_greedy_and_finite, check_seeds

    torch.manual_seed(int(os.environ["SEED"]))
    check_greedy_and_finite("cpu", vocab=10000, rows=5)   # three chunks, the last one partial
    check_greedy_and_finite("cpu", vocab=37, rows=1)
    check_distribution("cpu", vocab=12, draws=700, temperature=0.7, top=4, limit=26.0)  # 4 dof: p = 1e-5 at 25.4
    check_seeds("cpu", vocab=100)
    print("ok")
    """
)


def test_sample_kernel_in_triton_interpreter():
    run_in_triton_interpreter(CASES, timeout=240)

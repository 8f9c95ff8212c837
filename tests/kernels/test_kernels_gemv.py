"""The dense few-row GEMV run by Triton's CPU interpreter on small shapes (in a child process:
the interpreter is chosen when Triton is imported). The GPU test covers the real shapes."""

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton", reason="Triton has wheels for Linux only (the test extra installs it there)")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

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
    seed = int.from_bytes(os.urandom(4), "little")
    env = dict(os.environ, TRITON_INTERPRET="1", SEED=str(seed), PYTHONPATH=ROOT)
    done = subprocess.run([sys.executable, "-c", CASES], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), f"seed {seed}\n{done.stdout}\n{done.stderr}"

"""The fused rotary + KV-cache write kernel, run by Triton's CPU interpreter on small shapes.

The interpreter is chosen when Triton is imported (TRITON_INTERPRET=1), so the cases run in a
child process. They cover head counts that are not powers of two, one token, and that nothing
outside the token's slots is written; the GPU test runs the compiled kernel at gpt-oss shapes.
"""

import os
import subprocess
import sys

import pytest

pytest.importorskip("triton", reason="Triton has wheels for Linux only (the test extra installs it there)")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CASES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "rope_cache_cases.py")


def test_kernel_in_triton_interpreter():
    seed = int.from_bytes(os.urandom(4), "little")
    env = dict(os.environ, TRITON_INTERPRET="1", SEED=str(seed), PYTHONPATH=ROOT)
    done = subprocess.run([sys.executable, CASES, "cpu"], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=240)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), f"seed {seed}\n{done.stdout}\n{done.stderr}"

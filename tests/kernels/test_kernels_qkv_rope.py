"""The QKV projection with rotary and cache write in its epilogue (kernels/qkv_rope.py), run by Triton's CPU
interpreter on small shapes (in a child process: the interpreter is chosen when Triton is imported); the GPU
test runs it compiled at gpt-oss shapes."""

import pytest
from kernel_checks import run_in_triton_interpreter

pytest.importorskip("triton", reason="Triton has wheels for Linux only (the test extra installs it there)")

CASES = """
import runpy, sys
sys.argv = ["qkv_rope_cases.py", "cpu"]
runpy.run_path("tests/kernels/qkv_rope_cases.py", run_name="__main__")
"""


def test_qkv_rope_in_triton_interpreter():
    run_in_triton_interpreter(CASES, timeout=240)

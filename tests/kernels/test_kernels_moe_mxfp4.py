"""The MXFP4 grouped expert GEMM kernel run by Triton's CPU interpreter on small shapes.

The interpreter is chosen when Triton is imported (TRITON_INTERPRET=1), so the cases run in
a child process: this one may already hold a compiled-mode Triton. They cover the in-kernel
expert lookup (empty experts, one expert, rows past every tile), the nibble order and scales
of the widening, the masked K tail and wrapped columns, and the fused SwiGLU, for the
tensor-core kernel's plain widening; the GPU tests cover tl.dot_scaled and the decode GEMV.
"""

import textwrap

import pytest
from kernel_checks import run_in_triton_interpreter

pytest.importorskip("triton", reason="Triton has wheels for Linux only (the test extra installs it there)")

CASES = textwrap.dedent(
    """
    import os, torch
    from kernels.moe_mxfp4 import TileConfig, grouped_mxfp4_linear, grouped_mxfp4_linear_reference

    torch.manual_seed(int(os.environ["SEED"]))
    for experts, k, n_out, counts, config in [
        (4, 96, 40, [5, 0, 19, 1], TileConfig(16, 32, 64, 4, 1)),   # K tail, columns wrap, an empty expert
        (4, 128, 64, [0, 0, 0, 33], TileConfig(16, 64, 64, 4, 1)),  # all rows in the last expert
        (3, 64, 32, [1, 1, 1], TileConfig(16, 32, 64, 4, 1)),       # one row each
        (5, 64, 48, [0, 17, 0, 16, 0], TileConfig(32, 16, 32, 4, 1)),
        (4, 96, 40, [5, 0, 19, 1], TileConfig(16, 32, 64, 4, 1, swap_ab=True)),
        (5, 64, 48, [0, 17, 0, 16, 0], TileConfig(16, 64, 32, 4, 1, swap_ab=True)),
    ]:
        for swiglu in (None, (1.702, 7.0)):  # the clamped SwiGLU fused in the store: [N, out/2]
            blocks = torch.randint(0, 256, (experts, n_out, k // 32, 16), dtype=torch.uint8)
            scales = torch.randint(120, 125, (experts, n_out, k // 32), dtype=torch.uint8)
            bias = torch.randn(experts, n_out).to(torch.bfloat16)
            offsets = torch.zeros(experts + 1, dtype=torch.int32)
            offsets[1:] = torch.cumsum(torch.tensor(counts), 0)
            x = torch.randn(int(offsets[-1]), k).to(torch.bfloat16)
            width = n_out // 2 if swiglu else n_out
            out = torch.full((x.shape[0], width), float("nan"), dtype=torch.bfloat16)
            grouped_mxfp4_linear(x, blocks, scales, bias, offsets, out=out, config=config, swiglu=swiglu)
            ref = grouped_mxfp4_linear_reference(x, blocks, scales, bias, offsets, swiglu=swiglu).double()
            assert not out.isnan().any(), (counts, "unwritten rows")
            err = float((out.double() - ref).norm() / ref.norm())
            # the interpreter rounds float32 -> bf16 toward zero: about twice bf16's rounding error,
            # and the fused SwiGLU rounds twice (gate_up, as the unfused path stores it, then h)
            assert err <= (2e-2 if swiglu else 1e-2), (counts, swiglu, err)
    print("ok")
    """
)


def test_kernel_in_triton_interpreter():
    run_in_triton_interpreter(CASES, timeout=240)

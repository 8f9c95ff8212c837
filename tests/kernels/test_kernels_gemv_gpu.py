"""The dense few-row GEMV (kernels/gemv.py, Triton) against its torch reference (GPU only)."""

import pytest
import torch

from kernel_checks import poisoned, rel_err

pytestmark = pytest.mark.gpu

TOL = 1e-2
SHAPES = [(5120, 2880), (2880, 4096), (32, 2880), (201088, 2880), (37, 100), (1, 8)]  # (N, K): 20b's, odd


@pytest.mark.parametrize("rows", [1, 2, 3, 4])
@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
def test_gemv(rows, n, k, bias):
    from kernels.gemv import DEFAULT, GemvConfig, gemv, gemv_reference

    x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, device="cuda", dtype=torch.bfloat16) if bias else None
    ref = gemv_reference(x, w, b)
    for config in (DEFAULT, GemvConfig(8, 1024, 8), GemvConfig(2, 256, 2)):
        out = poisoned(rows, n)
        y = gemv(x, w, b, out=out, config=config)
        assert y.data_ptr() == out.data_ptr()
        assert rel_err(y, ref) <= TOL, config


def test_gemv_rejects_what_it_cannot_do():
    from kernels.gemv import MAX_ROWS, gemv

    w = torch.randn(8, 64, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="rows"):
        gemv(torch.randn(MAX_ROWS + 1, 64, device="cuda", dtype=torch.bfloat16), w)
    with pytest.raises(ValueError, match="weight"):
        gemv(torch.randn(1, 32, device="cuda", dtype=torch.bfloat16), w)
    with pytest.raises(ValueError, match="bf16"):
        gemv(torch.randn(1, 64, device="cuda"), w)

"""The CuTeDSL MXFP4 decode GEMV (kernels/mxfp4_gemv.py) against the torch reference (GPU only)."""

import pytest
import torch

from kernel_checks import poisoned, rel_err
from test_kernels_moe_mxfp4_gpu import expert_offsets, random_mxfp4

pytestmark = pytest.mark.gpu

TOL = 1e-2
HIDDEN = 2880


@pytest.mark.parametrize("rows", [1, 4, 7, 16])
@pytest.mark.parametrize("experts,n_out", [(32, 2 * HIDDEN), (32, HIDDEN), (128, 2 * HIDDEN), (128, HIDDEN)])
@pytest.mark.parametrize("split", ["random", "sparse", "one"])
@pytest.mark.parametrize("swiglu", [None, (1.702, 7.0)])
def test_mxfp4_gemv(rows, experts, n_out, split, swiglu):
    from kernels.mxfp4_gemv import mxfp4_gemv, mxfp4_gemv_reference

    blocks, scales, bias = random_mxfp4(experts, n_out, HIDDEN)
    offsets = expert_offsets(rows, experts, split)
    x = torch.randn(rows, HIDDEN, device="cuda", dtype=torch.bfloat16) * (4 if swiglu else 1)  # reach the clamp
    ref = mxfp4_gemv_reference(x, blocks, scales, bias, offsets, swiglu=swiglu)
    for rows_per_cta in (8, 32):  # the default, and lanes holding a row each
        out = poisoned(*ref.shape)
        y = mxfp4_gemv(x, blocks, scales, bias, offsets, out=out, swiglu=swiglu, rows_per_cta=rows_per_cta)
        assert y.data_ptr() == out.data_ptr()
        assert rel_err(y, ref) <= TOL, rows_per_cta


@pytest.mark.parametrize("k,n_out,rows_per_cta", [(96, 40, 32), (64, 48, 8), (1056, 200, 16), (128, 34, 2)])
def test_mxfp4_gemv_odd_shapes(k, n_out, rows_per_cta):
    """K of a few groups (idle lanes, one warp) or past 32 groups (two warps); out not a multiple of the rows a CTA takes."""
    from kernels.mxfp4_gemv import mxfp4_gemv, mxfp4_gemv_reference

    blocks, scales, bias = random_mxfp4(5, n_out, k)
    offsets = expert_offsets(9, 5, "random")
    x = torch.randn(9, k, device="cuda", dtype=torch.bfloat16)
    for swiglu in (None, (1.702, 7.0)):
        ref = mxfp4_gemv_reference(x, blocks, scales, bias, offsets, swiglu=swiglu)
        out = poisoned(*ref.shape)
        mxfp4_gemv(x, blocks, scales, bias, offsets, out=out, swiglu=swiglu, rows_per_cta=rows_per_cta)
        assert rel_err(out, ref) <= TOL, swiglu


def test_mxfp4_gemv_leaves_unrouted_rows():
    """Rows before offsets[0] and past offsets[E] belong to no expert: left as they were."""
    from kernels.mxfp4_gemv import mxfp4_gemv, mxfp4_gemv_reference

    blocks, scales, bias = random_mxfp4(4, 64, 96)
    x = torch.randn(8, 96, device="cuda", dtype=torch.bfloat16)
    offsets = torch.tensor([2, 3, 3, 5, 6], dtype=torch.int32, device="cuda")
    out = poisoned(8, 64)
    mxfp4_gemv(x, blocks, scales, bias, offsets, out=out)
    assert out[:2].isnan().all() and out[6:].isnan().all()
    ref = mxfp4_gemv_reference(x, blocks, scales, bias, offsets)
    assert rel_err(out[2:6], ref[2:6]) <= TOL


def test_mxfp4_gemv_graph_replay():
    """Captured once, replayed after the routing changed in place: the kernel reads the offsets on the device."""
    from kernels.mxfp4_gemv import mxfp4_gemv, mxfp4_gemv_reference

    blocks, scales, bias = random_mxfp4(32, HIDDEN, HIDDEN)
    x = torch.randn(4, HIDDEN, device="cuda", dtype=torch.bfloat16)
    offsets = expert_offsets(4, 32, "random")
    out = poisoned(4, HIDDEN)
    mxfp4_gemv(x, blocks, scales, bias, offsets, out=out)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        mxfp4_gemv(x, blocks, scales, bias, offsets, out=out)
    for split in ("one", "sparse", "random"):
        offsets.copy_(expert_offsets(4, 32, split))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert rel_err(out, mxfp4_gemv_reference(x, blocks, scales, bias, offsets)) <= TOL


@pytest.mark.parametrize("tokens", [1, 3, 4])
@pytest.mark.parametrize("swiglu", [None, (1.702, 7.0)])
def test_mxfp4_gemv_reads_rows_in_place(tokens, swiglu):
    """x_rows: routed row i reads token x_rows[i] of the undispatched x, as the route kernel's src gives it."""
    from kernels.moe_dispatch import route
    from kernels.mxfp4_gemv import mxfp4_gemv, mxfp4_gemv_reference

    experts, top_k = 32, 4
    blocks, scales, bias = random_mxfp4(experts, 2 * HIDDEN, HIDDEN)
    x = torch.randn(tokens, HIDDEN, device="cuda", dtype=torch.bfloat16)
    ids = torch.rand(tokens, experts, device="cuda").argsort(1)[:, :top_k].to(torch.int32).contiguous()
    routing = route(ids, experts)
    ref = mxfp4_gemv_reference(x, blocks, scales, bias, routing.offsets, swiglu=swiglu, x_rows=routing.src)
    out = poisoned(*ref.shape)
    mxfp4_gemv(x, blocks, scales, bias, routing.offsets, out=out, swiglu=swiglu, x_rows=routing.src)
    assert rel_err(out, ref) <= TOL

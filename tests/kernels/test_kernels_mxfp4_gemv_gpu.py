"""The CuTeDSL MXFP4 decode GEMV (kernels/mxfp4_gemv.py) against the torch reference (GPU only)."""

import pytest
import torch

from kernel_checks import poisoned, rel_err
from test_kernels_moe_mxfp4_gpu import expert_offsets, random_mxfp4

pytestmark = pytest.mark.gpu

TOL = 1e-2
HIDDEN = 2880
KERNELS = [(True, 16, 1), (True, 16, 8), (True, 16, 4), (False, 8, 1), (False, 32, 1)]  # (tensor cores, rows_per_cta, cols)
MMA = [(True, 1), (True, 8), (False, 1)]  # (tensor cores, routed rows a tile)


def gemv(mma: bool, x, blocks, *args, **kwargs):
    """mxfp4_gemv on the checkpoint's blocks (FMA kernel), or with mma on their repacked copy (tensor cores)."""
    from kernels.mxfp4_gemv import mxfp4_gemv
    from kernels.mxfp4_mma import repack

    return mxfp4_gemv(x, repack(blocks) if mma else blocks, *args, repacked=mma, **kwargs)


@pytest.mark.parametrize("rows", [1, 4, 7, 16, 40, 256])
@pytest.mark.parametrize("experts,n_out", [(32, 2 * HIDDEN), (32, HIDDEN), (128, 2 * HIDDEN), (128, HIDDEN)])
@pytest.mark.parametrize("split", ["random", "sparse", "one"])
@pytest.mark.parametrize("swiglu", [None, (1.702, 7.0)])
def test_mxfp4_gemv(rows, experts, n_out, split, swiglu):
    from kernels.mxfp4_gemv import mxfp4_gemv, mxfp4_gemv_reference

    blocks, scales, bias = random_mxfp4(experts, n_out, HIDDEN)
    offsets = expert_offsets(rows, experts, split)
    x = torch.randn(rows, HIDDEN, device="cuda", dtype=torch.bfloat16) * (4 if swiglu else 1)  # reach the clamp
    ref = mxfp4_gemv_reference(x, blocks, scales, bias, offsets, swiglu=swiglu)
    # the tensor-core kernel (a routed row a tile, or several of an expert), then the FMA one at its default
    # and with lanes holding a row each
    for mma, rows_per_cta, cols in KERNELS:
        out = poisoned(*ref.shape)
        y = gemv(mma, x, blocks, scales, bias, offsets, out=out, swiglu=swiglu, rows_per_cta=rows_per_cta, cols=cols)
        assert y.data_ptr() == out.data_ptr()
        assert rel_err(y, ref) <= TOL, (mma, rows_per_cta, cols)


def check_odd_shape(k: int, n_out: int, mma: bool, **kernel):
    """Five experts, nine rows, both epilogues through gemv(mma, ..., **kernel) against the reference -> (x, offsets)."""
    from kernels.mxfp4_gemv import mxfp4_gemv_reference

    blocks, scales, bias = random_mxfp4(5, n_out, k)
    offsets = expert_offsets(9, 5, "random")
    x = torch.randn(9, k, device="cuda", dtype=torch.bfloat16)
    for swiglu in (None, (1.702, 7.0)):
        ref = mxfp4_gemv_reference(x, blocks, scales, bias, offsets, swiglu=swiglu)
        out = poisoned(*ref.shape)
        gemv(mma, x, blocks, scales, bias, offsets, out=out, swiglu=swiglu, **kernel)
        assert rel_err(out, ref) <= TOL, (swiglu, mma, kernel)
    return x, offsets


@pytest.mark.parametrize("k,n_out,rows_per_cta", [(96, 40, 32), (64, 48, 8), (1056, 200, 16), (128, 34, 2)])
def test_mxfp4_gemv_odd_shapes(k, n_out, rows_per_cta):
    """K of a few groups (idle lanes, one warp) or past 32 groups (two warps); out not a multiple of the rows a CTA takes."""
    check_odd_shape(k, n_out, False, rows_per_cta=rows_per_cta)


@pytest.mark.parametrize("k,n_out", [(96, 48), (64, 16), (1056, 208), (2880, 5760 + 16), (224, 32), (160, 16)])
def test_mxfp4_mma_odd_shapes(k, n_out):
    """The tensor-core kernel at K of one partial quad (1, 2, 3 groups past the whole quads) or a few, a CTA
    looping over many tiles or one; out in 16-row tiles, which it must be (anything else is refused; the
    FMA kernel takes it)."""
    from kernels.mxfp4_gemv import mxfp4_gemv, mxfp4_gemv_reference

    check_odd_shape(k, n_out, True, cols=8)
    x, offsets = check_odd_shape(k, n_out, True)
    narrow = random_mxfp4(5, 8, k)
    with pytest.raises(ValueError, match="multiple of 16"):
        gemv(True, x, *narrow, offsets)
    assert rel_err(mxfp4_gemv(x, *narrow, offsets), mxfp4_gemv_reference(x, *narrow, offsets)) <= TOL


@pytest.mark.parametrize("mma,cols", MMA)
def test_mxfp4_gemv_leaves_unrouted_rows(mma, cols):
    """Rows before offsets[0] and past offsets[E] belong to no expert: left as they were."""
    from kernels.mxfp4_gemv import mxfp4_gemv_reference

    blocks, scales, bias = random_mxfp4(4, 64, 96)
    x = torch.randn(30, 96, device="cuda", dtype=torch.bfloat16)
    offsets = torch.tensor([2, 3, 3, 14, 25], dtype=torch.int32, device="cuda")  # 11 rows: a whole chunk and 3
    out = poisoned(30, 64)
    gemv(mma, x, blocks, scales, bias, offsets, out=out, cols=cols)
    assert out[:2].isnan().all() and out[25:].isnan().all()
    ref = mxfp4_gemv_reference(x, blocks, scales, bias, offsets)
    assert rel_err(out[2:25], ref[2:25]) <= TOL


@pytest.mark.parametrize("mma,cols", MMA)
def test_mxfp4_gemv_graph_replay(mma, cols):
    """Captured once, replayed after the routing changed in place: the kernel reads the offsets on the device
    (with several rows a tile, its chunks too: all rows in one expert's chunks, or spread over many)."""
    from kernels.mxfp4_gemv import mxfp4_gemv, mxfp4_gemv_reference
    from kernels.mxfp4_mma import repack

    n = 4 if cols == 1 else 64
    blocks, scales, bias = random_mxfp4(32, HIDDEN, HIDDEN)
    x = torch.randn(n, HIDDEN, device="cuda", dtype=torch.bfloat16)
    offsets = expert_offsets(n, 32, "random")
    out = poisoned(n, HIDDEN)
    weights = repack(blocks) if mma else blocks
    mxfp4_gemv(x, weights, scales, bias, offsets, out=out, repacked=mma, cols=cols)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        mxfp4_gemv(x, weights, scales, bias, offsets, out=out, repacked=mma, cols=cols)
    for split in ("one", "sparse", "random"):
        offsets.copy_(expert_offsets(n, 32, split))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert rel_err(out, mxfp4_gemv_reference(x, blocks, scales, bias, offsets)) <= TOL


@pytest.mark.parametrize("tokens", [1, 3, 4, 9, 64])
@pytest.mark.parametrize("swiglu", [None, (1.702, 7.0)])
@pytest.mark.parametrize("mma,cols", MMA)
def test_mxfp4_gemv_reads_rows_in_place(tokens, swiglu, mma, cols):
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
    gemv(mma, x, blocks, scales, bias, routing.offsets, out=out, swiglu=swiglu, x_rows=routing.src, cols=cols)
    assert rel_err(out, ref) <= TOL


def test_mxfp4_mma_scale_range():
    """The tensor-core kernel's float32 group factor 2**(s - 65) at the ends of its range: scale bytes
    0..MMA_MAX_SCALE (weights from 2**-128 to 6 * 2**65), every code, each weight row's output checked on its
    own (one scale per row, no bias); larger bytes are what mma_scales_ok turns away."""
    from kernels.mxfp4_gemv import mxfp4_gemv_reference
    from kernels.mxfp4_mma import MMA_MAX_SCALE, mma_scales_ok

    blocks, _, bias = random_mxfp4(4, 64, 256)
    bias.zero_()
    edges = torch.tensor([0, 1, 2, 100, 127, MMA_MAX_SCALE - 1, MMA_MAX_SCALE], dtype=torch.uint8, device="cuda")
    scales = edges[torch.randint(len(edges), (4, 64, 1), device="cuda")].expand(4, 64, 8).contiguous()
    offsets = expert_offsets(6, 4, "random")
    x = torch.randn(6, 256, device="cuda", dtype=torch.bfloat16)
    ref = mxfp4_gemv_reference(x, blocks, scales, bias, offsets).double()  # float64: norms of 1e-37 .. 1e21
    out = gemv(True, x, blocks, scales, bias, offsets).double()
    assert ((out - ref).norm(dim=0) / ref.norm(dim=0)).max() <= TOL  # per weight row (output column)
    assert mma_scales_ok(scales) and not mma_scales_ok(scales, scales + 1)


@pytest.mark.parametrize("mma,cols", MMA)
def test_mxfp4_gemv_down_starts_during_gate_up(mma, cols):
    """Route, gate_up + SwiGLU, then down with route_settled (its weight copies start before its PDL wait,
    while gate_up runs), captured once and replayed after the router's choice changed in place: down
    must read this replay's offsets, not an earlier layer's or replay's."""
    from kernels.moe_dispatch import route
    from kernels.mxfp4_gemv import mxfp4_gemv, mxfp4_gemv_reference
    from kernels.mxfp4_mma import repack

    experts, top_k, clamp = 32, 4, (1.702, 7.0)
    gate_up, down = random_mxfp4(experts, 2 * HIDDEN, HIDDEN), random_mxfp4(experts, HIDDEN, HIDDEN)
    copies = [repack(w[0]) if mma else w[0] for w in (gate_up, down)]
    tokens = 1 if cols == 1 else 16
    x = torch.randn(tokens, HIDDEN, device="cuda", dtype=torch.bfloat16) * 4

    def choose():
        return torch.rand(tokens, experts, device="cuda").argsort(1)[:, :top_k].to(torch.int32).contiguous()

    ids = choose()

    def step():
        routing = route(ids, experts)
        hidden = mxfp4_gemv(x, copies[0], *gate_up[1:], routing.offsets, swiglu=clamp, x_rows=routing.src,
                            repacked=mma, cols=cols)
        return routing, hidden, mxfp4_gemv(hidden, copies[1], *down[1:], routing.offsets, repacked=mma,
                                           route_settled=True, cols=cols)

    step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        routing, hidden, y = step()
    for _ in range(3):
        ids.copy_(choose())
        y.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        h_ref = mxfp4_gemv_reference(x, *gate_up, routing.offsets, swiglu=clamp, x_rows=routing.src)
        assert rel_err(hidden, h_ref) <= TOL
        assert rel_err(y, mxfp4_gemv_reference(hidden, *down, routing.offsets)) <= TOL

"""triton-kernels' matmul_ogs as the experts' prefill GEMM (kernels/moe_triton_kernels.py) against the torch
reference (GPU, and triton_kernels importable: bench/fetch_device_deps.sh brings it to the device)."""

import pytest
import torch

from kernel_checks import rel_err
from test_kernels_moe_mxfp4_gpu import expert_offsets, random_mxfp4

pytestmark = pytest.mark.gpu

TOL = 1e-2
HIDDEN = 2880


@pytest.fixture(scope="module", autouse=True)
def needs_triton_kernels():
    from kernels import moe_triton_kernels

    if not moe_triton_kernels.available():
        pytest.skip("triton_kernels (matmul_ogs) is not importable here: an optional dependency")


@pytest.mark.parametrize("rows", [129, 1000, 4096])
@pytest.mark.parametrize("n_out", [2 * HIDDEN, HIDDEN])
@pytest.mark.parametrize("split", ["random", "sparse", "one"])
@pytest.mark.parametrize("swiglu", [None, (1.702, 7.0)])
def test_matmul_ogs_projection(rows, n_out, split, swiglu):
    from kernels.moe_mxfp4 import grouped_mxfp4_linear_reference
    from kernels.moe_triton_kernels import TritonKernelsProjection, expert_ranges, fits

    experts = 32
    blocks, scales, bias = random_mxfp4(experts, n_out, HIDDEN)
    offsets = expert_offsets(rows, experts, split)
    counts = (offsets[1:] - offsets[:-1]).to(torch.int32).contiguous()
    x = torch.randn(rows, HIDDEN, device="cuda", dtype=torch.bfloat16) * (4 if swiglu else 1)  # reach the clamp
    ref = grouped_mxfp4_linear_reference(x, blocks, scales, bias, offsets, swiglu=swiglu)
    assert fits(blocks)
    y = TritonKernelsProjection(blocks, scales, bias)(x, expert_ranges(counts, experts, rows), swiglu=swiglu)
    assert y.shape == ref.shape and y.dtype == ref.dtype
    assert rel_err(y, ref) <= TOL


def test_matmul_ogs_graph_replay():
    """Captured once, replayed after the counts changed in place: the expert ranges come from the device."""
    from kernels.moe_mxfp4 import grouped_mxfp4_linear_reference
    from kernels.moe_triton_kernels import TritonKernelsProjection, expert_ranges

    experts, rows = 32, 512
    blocks, scales, bias = random_mxfp4(experts, HIDDEN, HIDDEN)
    projection = TritonKernelsProjection(blocks, scales, bias)
    x = torch.randn(rows, HIDDEN, device="cuda", dtype=torch.bfloat16)
    offsets = expert_offsets(rows, experts, "random")
    counts = (offsets[1:] - offsets[:-1]).to(torch.int32).contiguous()
    projection(x, expert_ranges(counts, experts, rows))
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = projection(x, expert_ranges(counts, experts, rows))
    for split in ("one", "sparse", "random"):
        offsets = expert_offsets(rows, experts, split)
        counts.copy_(offsets[1:] - offsets[:-1])
        y.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert rel_err(y, grouped_mxfp4_linear_reference(x, blocks, scales, bias, offsets)) <= TOL


@pytest.mark.parametrize("tokens", [33, 1024])
@pytest.mark.parametrize("swiglu", [None, (1.702, 7.0)])
def test_matmul_ogs_gathers_token_rows(tokens, swiglu):
    """gather = the route's src over the token rows gives what the dispatched rows give, row for row."""
    from kernels.moe_dispatch import dispatch, route
    from kernels.moe_triton_kernels import TritonKernelsProjection, expert_ranges

    experts, k = 32, 4
    blocks, scales, bias = random_mxfp4(experts, 2 * HIDDEN, HIDDEN)
    projection = TritonKernelsProjection(blocks, scales, bias)
    x = torch.randn(tokens, HIDDEN, device="cuda", dtype=torch.bfloat16) * (4 if swiglu else 1)
    ids = torch.rand(tokens, experts, device="cuda").argsort(1)[:, :k].to(torch.int32).contiguous()
    routing = route(ids, experts)
    ranges = expert_ranges(routing.counts, experts, tokens * k)
    dispatched = projection(dispatch(x, routing), ranges, swiglu=swiglu)
    gathered = projection(x, ranges, swiglu=swiglu, gather=routing.src)
    assert gathered.shape == dispatched.shape
    assert rel_err(gathered, dispatched) <= TOL

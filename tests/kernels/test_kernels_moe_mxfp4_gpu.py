"""The MXFP4 grouped expert GEMM (Triton) against its torch reference at gpt-oss shapes (GPU only)."""

import pytest
import torch

from kernel_checks import poisoned, rel_err

pytestmark = pytest.mark.gpu

TOL = 1e-2
HIDDEN = 2880  # K of both projections, and out of down (gpt-oss-20b and -120b alike)
ROWS = [1, 4, 37, 256, 4096]  # routed rows N = tokens * top-k: one row, odd, decode, prefill
SHAPES = [(32, 2 * HIDDEN), (32, HIDDEN), (128, 2 * HIDDEN), (128, HIDDEN)]  # (experts, out): 20b, 120b


def decode_tile():
    """The tensor-core tile the table picks just past the GEMV (N 17..256), forced at any N."""
    from kernels.moe_mxfp4 import TILE_CONFIGS

    return TILE_CONFIGS[0][1]


def random_mxfp4(experts: int, n_out: int, k: int):
    """Random packed experts: any byte is a valid pair of e2m1 codes; scales 2**-7 .. 2**-3 keep
    outputs O(1). -> blocks [E, out, k/32, 16] uint8, scales [E, out, k/32] uint8, bias [E, out] bf16."""
    blocks = torch.randint(0, 256, (experts, n_out, k // 32, 16), dtype=torch.uint8, device="cuda")
    scales = torch.randint(120, 125, (experts, n_out, k // 32), dtype=torch.uint8, device="cuda")
    bias = torch.randn(experts, n_out, device="cuda").to(torch.bfloat16)
    return blocks, scales, bias


def expert_offsets(rows: int, experts: int, split: str) -> torch.Tensor:
    """[E+1] int32 on the device: rows split at random ('random'), among a quarter of the
    experts (the rest empty: 'sparse'), or all in one expert ('one')."""
    if split == "one":
        counts = torch.zeros(experts, dtype=torch.int64)
        counts[torch.randint(experts, ()).item()] = rows
    else:
        pool = experts if split == "random" else max(1, experts // 4)
        chosen = torch.randperm(experts)[:pool]
        counts = torch.bincount(chosen[torch.randint(pool, (rows,))], minlength=experts)
    offsets = torch.zeros(experts + 1, dtype=torch.int32)
    offsets[1:] = torch.cumsum(counts, 0)
    return offsets.cuda()


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("experts,n_out", SHAPES)
@pytest.mark.parametrize("split", ["random", "sparse", "one"])
@pytest.mark.parametrize("dot_scaled", [True, False])
def test_grouped_mxfp4_linear(rows, experts, n_out, split, dot_scaled):
    _check_against_reference(rows, experts, n_out, split, dot_scaled=dot_scaled)


@pytest.mark.parametrize("rows", [1, 4, 37, 256])
@pytest.mark.parametrize("experts,n_out", SHAPES)
@pytest.mark.parametrize("split", ["random", "sparse", "one"])
def test_grouped_mxfp4_decode_tile(rows, experts, n_out, split):
    """The tensor-core decode tile at any N, also where the table picks the CUDA-core GEMV (N <= 16)."""
    _check_against_reference(rows, experts, n_out, split, config=decode_tile())


def _check_against_reference(rows, experts, n_out, split, **options):
    """grouped_mxfp4_linear(..., **options) into a poisoned output, against the torch reference."""
    from kernels.moe_mxfp4 import grouped_mxfp4_linear, grouped_mxfp4_linear_reference

    blocks, scales, bias = random_mxfp4(experts, n_out, HIDDEN)
    offsets = expert_offsets(rows, experts, split)
    x = torch.randn(rows, HIDDEN, device="cuda", dtype=torch.bfloat16)
    out = poisoned(rows, n_out)
    y = grouped_mxfp4_linear(x, blocks, scales, bias, offsets, out=out, **options)
    assert y.data_ptr() == out.data_ptr()
    assert rel_err(y, grouped_mxfp4_linear_reference(x, blocks, scales, bias, offsets)) <= TOL


def test_grouped_mxfp4_linear_uneven_tiles():
    """K and out not multiples of the tiles (masked K tail, wrapped columns)."""
    from kernels.moe_mxfp4 import TileConfig, grouped_mxfp4_linear, grouped_mxfp4_linear_reference

    experts, n_out, k, rows = 8, 200, 96 * 3, 45
    blocks, scales, bias = random_mxfp4(experts, n_out, k)
    offsets = expert_offsets(rows, experts, "random")
    x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
    ref = grouped_mxfp4_linear_reference(x, blocks, scales, bias, offsets)
    for dot_scaled in (True, False):
        for config in (TileConfig(16, 64, 128, 4, 2), TileConfig(16, 64, 128, 4, 2, swap_ab=True),
                       TileConfig(64, 128, 64, 8, 3), TileConfig(32, 128, 64, 4, 3, swap_ab=True)):
            out = poisoned(rows, n_out)
            grouped_mxfp4_linear(x, blocks, scales, bias, offsets, out=out, config=config, dot_scaled=dot_scaled)
            assert rel_err(out, ref) <= TOL, (config, dot_scaled)


@pytest.mark.parametrize("rows,mma", [(64, False), (4, False), (4, True)])
def test_grouped_mxfp4_linear_graph_replay(rows, mma):
    """Captured once, replayed after the routing changed in place: the grid and the kernel
    read nothing from the host, so the new offsets take effect: the table's kernel for 64 rows
    (tensor cores) and 4 rows (the CuTeDSL GEMV), and the tensor-core tile forced at 4 rows."""
    from kernels.moe_mxfp4 import grouped_mxfp4_linear, grouped_mxfp4_linear_reference

    config = decode_tile() if mma else None
    experts = 32
    blocks, scales, bias = random_mxfp4(experts, HIDDEN, HIDDEN)
    x = torch.randn(rows, HIDDEN, device="cuda", dtype=torch.bfloat16)
    offsets = expert_offsets(rows, experts, "random")
    out = poisoned(rows, HIDDEN)
    grouped_mxfp4_linear(x, blocks, scales, bias, offsets, out=out, config=config)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        grouped_mxfp4_linear(x, blocks, scales, bias, offsets, out=out, config=config)
    for split in ("one", "sparse", "random"):
        offsets.copy_(expert_offsets(rows, experts, split))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert rel_err(out, grouped_mxfp4_linear_reference(x, blocks, scales, bias, offsets)) <= TOL


@pytest.mark.parametrize("rows", [1, 4, 37, 256, 4096])
@pytest.mark.parametrize("experts", [32, 128])
def test_grouped_mxfp4_linear_fused_swiglu(rows, experts):
    """gate_up with the clamped SwiGLU in its store ([N, out/2]), by the table's kernel for N and by
    the tensor-core decode tile, against the reference's gate_up then kernels/swiglu.py's reference."""
    from kernels.moe_mxfp4 import grouped_mxfp4_linear, grouped_mxfp4_linear_reference

    blocks, scales, bias = random_mxfp4(experts, 2 * HIDDEN, HIDDEN)
    offsets = expert_offsets(rows, experts, "random")
    x = torch.randn(rows, HIDDEN, device="cuda", dtype=torch.bfloat16) * 4  # reach the clamp at +-7
    ref = grouped_mxfp4_linear_reference(x, blocks, scales, bias, offsets, swiglu=(1.702, 7.0))
    for config in (None, decode_tile()):
        out = poisoned(rows, HIDDEN)
        grouped_mxfp4_linear(x, blocks, scales, bias, offsets, out=out, config=config, swiglu=(1.702, 7.0))
        assert rel_err(out, ref) <= TOL, config

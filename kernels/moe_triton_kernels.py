"""OpenAI's triton-kernels MXFP4 grouped matmul (`matmul_ogs`) for the experts in captured steps.

    xs      [N, K]   bf16   routed rows in expert order (rows offsets[e]:offsets[e+1] -> expert e), or the
                            token rows [T, K] with gather = the route's src (gate_up: no dispatch copy)
    ranges  expert_ranges(counts, E, N): the expert of each row, from the route's counts on the device
    ys      [N, out] bf16   or [N, out/2] with the clamped SwiGLU of the interleaved gate/up outputs

The same contract as kernels/moe_mxfp4.py's grouped_mxfp4_linear, on a copy of the experts in
triton-kernels' Hopper layouts (made once at load, as vLLM makes it): the fp4 codes bit-twiddled
and swizzled so a thread's loaded bytes widen with a few shifts and masks straight into the MMA's
operand registers, the scales swizzled to match. On an H100 at gpt-oss-20b shapes it ran the
expert block 1.46x / 1.56x faster than our Triton tiles at 1024 / 4096 tokens
(`python -m bench.triton_kernels_moe`, docs/BENCHMARKS.md). But `matmul_ogs` does enough Python per
call (opt flags, allocation, wrappers) that an eager prefill step with it was host-bound (1024
tokens: 19.3 ms of kernels in a 33.3 ms step), so the cuda backend runs it in captured steps, whose
replays skip the host work: the decode graphs past the tensor-core GEMV's rows and the prefill graphs
(services/worker/model/cuda_prefill_graphs.py); eagerly only past `ROSE_MOE_TK_EAGER_ROWS` rows.

It is not on PyPI (triton-kernels 0.1.0 there is a placeholder): bench/fetch_device_deps.sh takes
the copy vLLM's wheel vendors; anything that puts a `triton_kernels` package with `matmul_ogs` and
`routing` on the path works.
"""

from __future__ import annotations

import importlib.util

import torch


def available() -> bool:
    """Whether triton_kernels (with matmul_ogs) imports here."""
    if importlib.util.find_spec("triton_kernels") is None:
        return False
    try:
        import triton_kernels.matmul_ogs  # noqa: F401
        import triton_kernels.routing  # noqa: F401
    except Exception:  # noqa: BLE001 - an incompatible Triton breaks the import: then ours runs
        return False
    return True


def fits(blocks: torch.Tensor) -> bool:
    """Whether matmul_ogs's Hopper tiles take this projection: its kernel wants 256-wide output tiles (it
    picks narrower ones, which its swizzled layouts refuse, for 128 outputs or fewer) and a K of 256 or more."""
    e, out, groups, _ = blocks.shape
    return out >= 256 and groups * 32 >= 256


def expert_ranges(counts: torch.Tensor, experts: int, n: int):
    """triton-kernels' description of n rows in expert order from counts [E] int32 on the device (no host
    sync: the step stays capturable); one per routing, shared by gate_up and down."""
    from triton_kernels.routing import RoutingData, compute_expt_data

    return RoutingData(None, counts, experts, 1, compute_expt_data(counts, experts, n))


class TritonKernelsProjection:
    """One projection of every expert in triton-kernels' layouts: weights, scales and a float32 bias."""

    def __init__(self, blocks: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor):
        """blocks [E, out, K/32, 16] and scales [E, out, K/32] uint8 as the checkpoint stores them; bias [E, out]."""
        from triton_kernels.matmul_ogs import PrecisionConfig
        from triton_kernels.matmul_ogs_details import opt_flags
        from triton_kernels.tensor import FP4, convert_layout, wrap_torch_tensor
        from triton_kernels.tensor_details import layout

        opt_flags.update_opt_flags_constraints({"split_k": 1})  # as vLLM runs it on Hopper
        e, out, groups, _ = blocks.shape
        self.experts = e
        codes = blocks.reshape(e, out, groups * 16).transpose(-2, -1)  # [E, K/2, out]: K on dim 1
        # the scale groups padded to a multiple of 4, as vLLM pads them on sm90
        padded = torch.nn.functional.pad(scales, (0, -groups % 4)).transpose(-2, -1)
        value_layout, value_opts = layout.make_default_matmul_mxfp4_w_layout(mx_axis=1)
        scale_layout, scale_opts = layout.make_default_matmul_mxfp4_w_scale_layout(mx_axis=1, num_warps=8)
        self.weight = convert_layout(wrap_torch_tensor(codes, dtype=FP4), value_layout, **value_opts)
        self.precision = PrecisionConfig(weight_scale=convert_layout(wrap_torch_tensor(padded), scale_layout,
                                                                     **scale_opts))
        self.bias = bias.float().contiguous()

    def __call__(self, xs: torch.Tensor, ranges, swiglu: tuple[float, float] | None = None,
                 gather: torch.Tensor | None = None) -> torch.Tensor:
        """xs [N, K] bf16 in expert order, ranges = expert_ranges(counts, E, N) -> [N, out] bf16 (or [N, out/2]
        with swiglu). gather [N] int32: routed row i is xs[gather[i]] (the route's src over the token rows
        [T, K]: the GEMM reads them in place, no dispatch copy)."""
        import triton_kernels.swiglu
        from triton_kernels.matmul_ogs import FnSpecs, FusedActivation, matmul_ogs
        from triton_kernels.routing import GatherIndx

        n = xs.shape[0] if gather is None else gather.shape[0]
        act = None
        if swiglu is not None:
            act = FusedActivation(FnSpecs("swiglu", triton_kernels.swiglu.swiglu_fn, ("alpha", "limit")), swiglu, 2)
        # one choice a row in `ranges` (n_expts_act 1), so the kernel reads row src_indx[i] itself
        rows = None if gather is None else GatherIndx(src_indx=gather, dst_indx=None)
        return matmul_ogs(xs, self.weight, self.bias, ranges, gather_indx=rows, precision_config=self.precision,
                          fused_activation=act).view(n, -1)


def copies_bytes(projections) -> int:
    """Bytes the converted copies of these (blocks, scales) take: about the blocks' and scales' own."""
    return sum(b.nbytes + s.nbytes for b, s in projections)

"""The cuda backend's MoE block: router top-k, dispatch, grouped expert GEMMs, SwiGLU, combine.

    logits = x W_r^T + b_r                       GEMV (decode) / cuBLAS [T, E]
    ids, weights = top-k + softmax                CuTeDSL router       [T, k] (with the route in one
                                                  kernel up to ROUTE_TOPK_MAX_TOKENS tokens; up to
                                                  norm_route.MAX_TOKENS the cuda backend does the norm
                                                  before, the router and the route in one Triton kernel,
                                                  kernels/norm_route.py, and calls routed_rows)
    xs = x permuted into expert groups            CuTeDSL route/dispatch [T*k, H] (decode's MXFP4
                                                  GEMV reads x's rows in place instead)
    h = swiglu(xs W_gu[e]^T + b_gu[e])            grouped GEMM (MXFP4: SwiGLU fused in its store;
                                                  bf16: + CuTeDSL swiglu) [T*k, I]
    ys = h W_d[e]^T + b_d[e]                      grouped GEMM         [T*k, H]
    y = sum_j weights[t, j] ys[pos(t, j)]         folded into the next RMSNorm by the cuda backend
                                                  (kernels/rmsnorm.py's combine_rmsnorm)

The grouped GEMMs take the per-expert row offsets on the device (no host sync), so
the step stays capturable. MXFP4 experts (the checkpoint's format) stay packed and go
through the Triton weight-only kernel (kernels/moe_mxfp4.py: fp4 dequantized in
registers, half the bytes of fp8 and a quarter of bf16 per decode step), and decode's GEMVs
through the tensor-core kernel on a bit-rearranged copy of the blocks where memory allows
(kernels/mxfp4_mma.py; `decode_copies` says when; with the copies it also takes batches up to
MMA_COLS_ROWS routed rows, several rows of an expert a tile) or the FMA kernel otherwise; past those
rows our Triton tiles, or in captured steps (decode graphs, prefill graphs) and eager ones past
`tk_eager_rows` OpenAI's triton-kernels (`matmul_ogs`) on its own copy where it imports and memory
allows (`triton_kernels_copies`; kernels/moe_triton_kernels.py), its gate_up reading the token rows in
place (`tk_gather`), so only our tiles need the dispatch copy; bf16 experts
[E, out, in] (rows = outputs) go through `torch._grouped_mm`, reading them transposed
in place.
"""

from __future__ import annotations

import contextlib
import contextvars
import os

import torch

from kernels import moe_triton_kernels
from kernels.gemv import linear
from kernels.moe_dispatch import ROUTE_TOPK_MAX_TOKENS, dispatch, route, route_topk
from kernels.router import router_topk
from kernels.swiglu import swiglu


def decode_copies(mlps, free_bytes: int) -> bool:
    """Whether the experts' decode GEMVs get their repacked copies (kernels/mxfp4_mma.py): ROSE_MXFP4_GEMV=mma
    always, =fma never, else (auto) when the copies take at most a quarter of the device's free memory
    (on an 80 GB GPU: gpt-oss-20b's blocks yes, 120b's no). The KV cache is sized after them."""
    choice = os.environ.get("ROSE_MXFP4_GEMV", "auto")
    if choice not in ("auto", "mma", "fma"):
        raise ValueError(f"ROSE_MXFP4_GEMV must be auto, mma or fma, got {choice!r}")
    packed = [m.experts for m in mlps if m.experts.packed]
    if choice != "auto" or not packed:
        return choice == "mma" and bool(packed)
    nbytes = sum(e.gate_up_proj_blocks.nbytes + e.down_proj_blocks.nbytes for e in packed)
    return nbytes <= free_bytes // 4


_CAPTURED_STEP = contextvars.ContextVar("rose_captured_step", default=False)


@contextlib.contextmanager
def captured_step():
    """The steps traced into a decode graph (and the eager run before each capture, which compiles what
    it launches): there triton-kernels' matmul_ogs may run, as replays skip its host work."""
    token = _CAPTURED_STEP.set(True)
    try:
        yield
    finally:
        _CAPTURED_STEP.reset(token)


def triton_kernels_copies(mlps, free_bytes: int) -> bool:
    """Whether the experts get triton-kernels' copies (kernels/moe_triton_kernels.py), which captured decode
    steps past MMA_COLS_ROWS routed rows then run: ROSE_MOE_TRITON_KERNELS=on always (an error where it
    does not import), =off never, else (auto) when it imports and the copies take at most a quarter of
    the device's free memory. The KV cache is sized after them."""
    choice = os.environ.get("ROSE_MOE_TRITON_KERNELS", "auto")
    if choice not in ("auto", "on", "off"):
        raise ValueError(f"ROSE_MOE_TRITON_KERNELS must be auto, on or off, got {choice!r}")
    packed = [m.experts for m in mlps if m.experts.packed]
    if choice == "off" or not packed:
        return False
    if not moe_triton_kernels.available():
        if choice == "on":
            raise RuntimeError("ROSE_MOE_TRITON_KERNELS=on but triton_kernels (with matmul_ogs) does not import "
                               "here: see kernels/moe_triton_kernels.py")
        return False
    nbytes = moe_triton_kernels.copies_bytes(
        (b, s) for e in packed for b, s in ((e.gate_up_proj_blocks, e.gate_up_proj_scales),
                                            (e.down_proj_blocks, e.down_proj_scales)))
    return choice == "on" or nbytes <= free_bytes // 4


class GroupedExperts:
    """One layer's router and experts as plain tensors (taken from the torch model's modules)."""

    def __init__(self, mlp, config, decode_copies: bool = False, triton_kernels_copies: bool = False):
        experts = mlp.experts
        self.num_experts = mlp.router.weight.shape[0]
        self.top_k = config.num_experts_per_tok
        self.router_w, self.router_b = mlp.router.weight, mlp.router.bias
        self.packed = experts.packed
        if self.packed:  # (blocks [E, out, in/32, 16], scales [E, out, in/32]) uint8 as stored
            self.gate_up = (experts.gate_up_proj_blocks, experts.gate_up_proj_scales)
            self.down = (experts.down_proj_blocks, experts.down_proj_scales)
            # decode's GEMVs (up to GEMV_ROWS routed rows) read these copies on the tensor cores, where
            # granted and the weights fit (None: the FMA kernel on the checkpoint's blocks)
            self.gate_up_mma = _decode_copy(*self.gate_up) if decode_copies else None
            self.down_mma = _decode_copy(*self.down) if decode_copies else None
            # with both copies, the tensor-core kernel also takes batches past GEMV_ROWS (several rows an expert)
            self.mma_cols = self.gate_up_mma is not None and self.down_mma is not None
            # past those rows, in captured decode steps: triton-kernels' matmul_ogs on its own copies where granted
            self.gate_up_tk = self.down_tk = None
            if triton_kernels_copies and moe_triton_kernels.fits(self.gate_up[0]) and moe_triton_kernels.fits(self.down[0]):
                self.gate_up_tk = moe_triton_kernels.TritonKernelsProjection(*self.gate_up, experts.gate_up_proj_bias)
                self.down_tk = moe_triton_kernels.TritonKernelsProjection(*self.down, experts.down_proj_bias)
        else:
            self.gate_up, self.down = experts.gate_up_proj, experts.down_proj  # [E, 2I, H], [E, H, I]
        self.gate_up_b, self.down_b = experts.gate_up_proj_bias, experts.down_proj_bias
        self.alpha, self.limit = experts.alpha, experts.limit
        self.early_down = early_down()  # read once, at load: graphs captured later run what eager steps run
        self.tk_eager_rows = tk_eager_rows()
        self.tk_gather = tk_gather()

    def expert_rows(self, x: torch.Tensor):
        """x [T, H] bf16 -> everything but the combine: (ys [T*k, H] in expert order, routing, weights [T, k]
        float32). The cuda backend combines them into the next RMSNorm (kernels/rmsnorm.py's combine_rmsnorm).
        """
        logits = linear(x, self.router_w, self.router_b).contiguous()
        if x.shape[0] <= ROUTE_TOPK_MAX_TOKENS:
            routing, weights = route_topk(logits, self.top_k)
        else:
            ids, weights = router_topk(logits, self.top_k)
            routing = route(ids, self.num_experts)
        return self.routed_rows(x, routing), routing, weights

    def routed_rows(self, x: torch.Tensor, routing) -> torch.Tensor:
        """The experts' outputs ys [T*k, H] in expert order for x [T, H] routed by `routing`."""
        if self.packed:
            from kernels.moe_mxfp4 import GEMV_ROWS, MMA_COLS_ROWS, grouped_mxfp4_linear
            from kernels.mxfp4_mma import COLS

            clamp = (self.alpha, self.limit)  # the SwiGLU's, fused into gate_up's store
            n = routing.src.numel()
            if x.is_cuda and (n <= GEMV_ROWS or (self.mma_cols and n <= MMA_COLS_ROWS)):
                # decode: the GEMV reads each token's row in place; past a few tokens a tile takes up to COLS
                # routed rows of its expert
                cols = 1 if n <= GEMV_ROWS else COLS
                hidden = _gemv(x, self.gate_up, self.gate_up_mma, self.gate_up_b, routing.offsets, swiglu=clamp,
                               x_rows=routing.src, cols=cols)
                # the routing is two kernels back now: down's weight copies may start during gate_up
                return _gemv(hidden, self.down, self.down_mma, self.down_b, routing.offsets,
                             route_settled=self.early_down, cols=cols)
            # matmul_ogs's host work (~0.3 ms a call) made eager prefill steps of 1024 tokens host-bound: captured
            # steps, which replay without it, take it, and eager ones only where the GEMMs outlast that work
            if self.gate_up_tk is not None and (_CAPTURED_STEP.get() or n >= self.tk_eager_rows):
                ranges = moe_triton_kernels.expert_ranges(routing.counts, self.num_experts, n)
                if self.tk_gather:  # gate_up reads each routed row's token row in place: no dispatch copy
                    hidden = self.gate_up_tk(x, ranges, swiglu=clamp, gather=routing.src)
                else:
                    hidden = self.gate_up_tk(dispatch(x, routing), ranges, swiglu=clamp)
                return self.down_tk(hidden, ranges)
            xs = dispatch(x, routing)
            hidden = grouped_mxfp4_linear(xs, *self.gate_up, self.gate_up_b, routing.offsets, swiglu=clamp)
            return grouped_mxfp4_linear(hidden, *self.down, self.down_b, routing.offsets)
        xs = dispatch(x, routing)
        n = xs.shape[0]
        expert_of_row = torch.repeat_interleave(
            torch.arange(self.num_experts, device=x.device), routing.counts, output_size=n
        )
        ends = routing.offsets[1:]
        gate_up = grouped_linear(xs, self.gate_up, ends) + self.gate_up_b[expert_of_row]
        hidden = swiglu(gate_up, self.alpha, self.limit)
        return grouped_linear(hidden, self.down, ends) + self.down_b[expert_of_row]


def early_down() -> bool:
    """Whether decode's down GEMV starts its weight copies during gate_up (ROSE_EARLY_DOWN=0: after, for A/B timing)."""
    return os.environ.get("ROSE_EARLY_DOWN", "1") != "0"


def tk_gather() -> bool:
    """Whether triton-kernels' gate_up gathers the token rows itself (ROSE_MOE_GATHER=0: dispatch them first,
    for A/B timing); read once at load, as early_down."""
    return os.environ.get("ROSE_MOE_GATHER", "1") != "0"


def tk_eager_rows() -> int:
    """Routed rows from which eager steps (long prompt chunks) run the experts on triton-kernels' copies too:
    ROSE_MOE_TK_EAGER_ROWS (default 6144, a 1536-token chunk of gpt-oss's top-4; 0: never)."""
    rows = int(os.environ.get("ROSE_MOE_TK_EAGER_ROWS", "6144"))
    return rows if rows > 0 else 1 << 62


def _decode_copy(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor | None:
    """The tensor-core GEMV's repacked copy of a projection's blocks, or None where the kernel can't take them."""
    from kernels.mxfp4_mma import mma_fits, repack

    return repack(blocks) if mma_fits(blocks, scales) else None


def _gemv(x, weights, copy, bias, offsets, **kwargs) -> torch.Tensor:
    """Decode's MXFP4 GEMV: the tensor-core kernel on the repacked copy if there is one, else the FMA kernel."""
    from kernels.mxfp4_gemv import mxfp4_gemv

    blocks, scales = weights
    return mxfp4_gemv(x, blocks if copy is None else copy, scales, bias, offsets, repacked=copy is not None, **kwargs)


def grouped_linear(x: torch.Tensor, weights: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """Rows [ends[e-1], ends[e]) of x times weights[e]^T. x [N, in]; weights [E, out, in]; ends [E] int32."""
    return torch._grouped_mm(x, weights.transpose(1, 2), offs=ends)


def grouped_linear_reference(x: torch.Tensor, weights: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """The same as a loop of per-expert matmuls (host sync on ends): the torch reference."""
    out = torch.empty(x.shape[0], weights.shape[1], dtype=x.dtype, device=x.device)
    start = 0
    for e, end in enumerate(ends.tolist()):
        out[start:end] = x[start:end] @ weights[e].T
        start = end
    return out

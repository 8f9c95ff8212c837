"""The cuda backend's MoE block: router top-k, dispatch, grouped expert GEMMs, SwiGLU, combine.

    logits = x W_r^T + b_r                       GEMV (decode) / cuBLAS [T, E]
    ids, weights = top-k + softmax                CuTeDSL router       [T, k] (with the route in one
                                                  kernel up to ROUTE_TOPK_MAX_TOKENS tokens)
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
registers, half the bytes of fp8 and a quarter of bf16 per decode step); bf16 experts
[E, out, in] (rows = outputs) go through `torch._grouped_mm`, reading them transposed
in place.
"""

from __future__ import annotations

import os

import torch

from kernels.gemv import linear
from kernels.moe_dispatch import ROUTE_TOPK_MAX_TOKENS, dispatch, route, route_topk
from kernels.router import router_topk
from kernels.swiglu import swiglu


class GroupedExperts:
    """One layer's router and experts as plain tensors (taken from the torch model's modules)."""

    def __init__(self, mlp, config):
        experts = mlp.experts
        self.num_experts = mlp.router.weight.shape[0]
        self.top_k = config.num_experts_per_tok
        self.router_w, self.router_b = mlp.router.weight, mlp.router.bias
        self.packed = experts.packed
        if self.packed:  # (blocks [E, out, in/32, 16], scales [E, out, in/32]) uint8 as stored
            from kernels.mxfp4_mma import mma_fits

            self.gate_up = (experts.gate_up_proj_blocks, experts.gate_up_proj_scales)
            self.down = (experts.down_proj_blocks, experts.down_proj_scales)
            # Decode's gate_up GEMV runs on the tensor cores from two tokens up, where the weights allow
            # (checked once, here): at 20b shapes (`python -m bench.gemv`, H100) it measured 7-13% faster
            # than the FMA kernel at 2-4 tokens, 4.5% slower at one (23.0 vs 22.0 us). down stays on the
            # FMA kernel (faster at 1-2 tokens, within 4% at 3-4). Decode graphs keep a single sequence
            # in the one-sequence bucket, so a graph runs the kernels eager runs. ROSE_MXFP4_GEMV=fma
            # keeps everything on the FMA kernel (A/B timing).
            self.gate_up_mma = os.environ.get("ROSE_MXFP4_GEMV") != "fma" and mma_fits(*self.gate_up)
        else:
            self.gate_up, self.down = experts.gate_up_proj, experts.down_proj  # [E, 2I, H], [E, H, I]
        self.gate_up_b, self.down_b = experts.gate_up_proj_bias, experts.down_proj_bias
        self.alpha, self.limit = experts.alpha, experts.limit

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
        if self.packed:
            from kernels.moe_mxfp4 import GEMV_ROWS, grouped_mxfp4_linear
            from kernels.mxfp4_gemv import mxfp4_gemv

            clamp = (self.alpha, self.limit)  # the SwiGLU's, fused into gate_up's store
            if x.is_cuda and routing.src.numel() <= GEMV_ROWS:  # decode: the GEMV reads each token's row in place
                hidden = mxfp4_gemv(x, *self.gate_up, self.gate_up_b, routing.offsets, swiglu=clamp,
                                    x_rows=routing.src, mma=self.gate_up_mma and x.shape[0] > 1)
            else:
                hidden = grouped_mxfp4_linear(dispatch(x, routing), *self.gate_up, self.gate_up_b, routing.offsets,
                                              swiglu=clamp)
            return grouped_mxfp4_linear(hidden, *self.down, self.down_b, routing.offsets), routing, weights
        xs = dispatch(x, routing)
        n = xs.shape[0]
        expert_of_row = torch.repeat_interleave(
            torch.arange(self.num_experts, device=x.device), routing.counts, output_size=n
        )
        ends = routing.offsets[1:]
        gate_up = grouped_linear(xs, self.gate_up, ends) + self.gate_up_b[expert_of_row]
        hidden = swiglu(gate_up, self.alpha, self.limit)
        ys = grouped_linear(hidden, self.down, ends) + self.down_b[expert_of_row]
        return ys, routing, weights


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

"""The MoE experts, ours against OpenAI's triton-kernels (`matmul_ogs`), gpt-oss-20b shapes, in one run.

    PYTHONPATH=.device/triton-kernels:$PYTHONPATH python -m bench.triton_kernels_moe [--tokens 1,8,64,1024,4096]

triton-kernels' `matmul_ogs` is the MXFP4 MoE matmul vLLM runs for gpt-oss on Hopper. Both sides start
from the same router logits [T, 32] and the same checkpoint tensors (MXFP4 blocks, e8m0 scales, bias)
and end with the combined rows [T, 2880]:
  ours            rose's own kernels: the cuda backend's GroupedExperts with its decode copies but not
                  triton-kernels' copies (the backend takes those past 128 rows where they import): the
                  fused route + top-k up to 256 tokens, else top-k then route; gate_up with the SwiGLU
                  fused, down: decode's tensor-core GEMV up to MMA_COLS_ROWS routed rows, several a
                  tile past 16, the grouped Triton GEMM past that; then the weighted combine
                  (kernels/moe_dispatch.py; the backend folds it into the next RMSNorm); and again
                  with the Triton GEMM from 17 rows
  triton-kernels  `routing` (top-k, softmax over the chosen, sort), `matmul_ogs` gate_up with the
                  gather and the SwiGLU fused, `matmul_ogs` down with the scatter and the gate weights
                  fused; its weights converted once to its Hopper MX layouts, as vLLM does.
Each side is timed as one captured graph over several routings (bench.kernels.measure), so the
touched experts differ call to call as in decode. The two outputs must agree (relative L2 error
below 2e-2: both round the SwiGLU output to bf16) or the run fails.

triton-kernels is not on PyPI (its 0.1.0 there is a placeholder): bench/fetch_device_deps.sh takes
the copy vLLM's wheel vendors (vllm/third_party/triton_kernels) into .device/triton-kernels.
"""

from __future__ import annotations

import argparse
import contextlib
import types

import torch

from bench.kernels import measure

HIDDEN, INTER, EXPERTS, TOP_K = 2880, 2880, 32, 4
ALPHA, LIMIT = 1.702, 7.0
ROUTINGS = 4  # logits sets per timed graph
AGREE = 2e-2


def random_checkpoint_experts() -> types.SimpleNamespace:
    """One layer's MoE as the checkpoint stores it: packed codes, scales near 2**0, bf16 bias and router."""
    def projection(n_out: int, k: int):
        blocks = torch.randint(0, 256, (EXPERTS, n_out, k // 32, 16), dtype=torch.uint8, device="cuda")
        scales = torch.randint(122, 126, (EXPERTS, n_out, k // 32), dtype=torch.uint8, device="cuda")
        bias = (torch.randn(EXPERTS, n_out, device="cuda") / 10).to(torch.bfloat16)
        return blocks, scales, bias

    (gu_b, gu_s, gu_bias), (d_b, d_s, d_bias) = projection(2 * INTER, HIDDEN), projection(HIDDEN, INTER)
    experts = types.SimpleNamespace(
        packed=True, gate_up_proj_blocks=gu_b, gate_up_proj_scales=gu_s, gate_up_proj_bias=gu_bias,
        down_proj_blocks=d_b, down_proj_scales=d_s, down_proj_bias=d_bias, alpha=ALPHA, limit=LIMIT)
    router = types.SimpleNamespace(weight=torch.randn(EXPERTS, HIDDEN, device="cuda").to(torch.bfloat16),
                                   bias=torch.zeros(EXPERTS, device="cuda", dtype=torch.bfloat16))
    return types.SimpleNamespace(experts=experts, router=router)


def ours(mlp):
    """x [T, H], logits [T, E] -> [T, H] through the cuda backend's own MoE path."""
    from kernels.moe_dispatch import ROUTE_TOPK_MAX_TOKENS, combine, route, route_topk
    from kernels.router import router_topk
    from services.worker.model.cuda_moe import GroupedExperts

    experts = GroupedExperts(mlp, types.SimpleNamespace(num_experts_per_tok=TOP_K), decode_copies=True)

    def forward(x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        if x.shape[0] <= ROUTE_TOPK_MAX_TOKENS:
            routing, weights = route_topk(logits, TOP_K)
        else:
            ids, weights = router_topk(logits, TOP_K)
            routing = route(ids, EXPERTS)
        return combine(experts.routed_rows(x, routing), routing, weights)

    return forward


@contextlib.contextmanager
def triton_tiles_past_gemv():
    """Ours as before the multi-column GEMV: past GEMV_ROWS routed rows, the grouped Triton tiles (A/B)."""
    from kernels import moe_mxfp4

    saved = moe_mxfp4.MMA_COLS_ROWS
    moe_mxfp4.MMA_COLS_ROWS = moe_mxfp4.GEMV_ROWS
    try:
        yield
    finally:
        moe_mxfp4.MMA_COLS_ROWS = saved


def triton_kernels(mlp):
    """x [T, H], logits [T, E] -> [T, H] through triton-kernels' routing and two matmul_ogs, as vLLM calls them."""
    import triton_kernels.swiglu
    from triton_kernels.matmul_ogs import FnSpecs, FusedActivation, matmul_ogs
    from triton_kernels.routing import routing

    from kernels.moe_triton_kernels import TritonKernelsProjection

    ex = mlp.experts  # converted to its Hopper layouts as the cuda backend converts them (and vLLM)
    gate_up = TritonKernelsProjection(ex.gate_up_proj_blocks, ex.gate_up_proj_scales, ex.gate_up_proj_bias)
    down = TritonKernelsProjection(ex.down_proj_blocks, ex.down_proj_scales, ex.down_proj_bias)
    w1, b1, p1 = gate_up.weight, gate_up.bias, gate_up.precision
    w2, b2, p2 = down.weight, down.bias, down.precision
    act = FusedActivation(FnSpecs("swiglu", triton_kernels.swiglu.swiglu_fn, ("alpha", "limit")), (ALPHA, LIMIT), 2)

    def forward(x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        rdata, gather, scatter = routing(logits, TOP_K, sm_first=False)
        h = matmul_ogs(x, w1, b1, rdata, gather_indx=gather, precision_config=p1, fused_activation=act)
        y = matmul_ogs(h, w2, b2, rdata, scatter_indx=scatter, precision_config=p2, gammas=rdata.gate_scal)
        return y.view(x.shape[0], -1)

    return forward


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def run(token_counts: list[int]) -> list[dict]:
    mlp = random_checkpoint_experts()
    ours_fn, theirs_fn = ours(mlp), triton_kernels(mlp)
    rows = []
    for tokens in token_counts:
        sets = [(torch.randn(tokens, HIDDEN, device="cuda").to(torch.bfloat16),
                 torch.randn(tokens, EXPERTS, device="cuda").to(torch.bfloat16)) for _ in range(ROUTINGS)]
        err = max(relative_error(ours_fn(x, g), theirs_fn(x, g)) for x, g in sets)
        if not err < AGREE:
            raise AssertionError(f"{tokens} tokens: ours and triton-kernels differ, relative L2 error {err:.3e}")
        t_ours, how_ours = measure([lambda x=x, g=g: ours_fn(x, g) for x, g in sets])
        with triton_tiles_past_gemv():
            t_tiles, _ = measure([lambda x=x, g=g: ours_fn(x, g) for x, g in sets])
        t_tk, how_tk = measure([lambda x=x, g=g: theirs_fn(x, g) for x, g in sets])
        flops = 2 * tokens * TOP_K * (2 * INTER * HIDDEN + HIDDEN * INTER)
        rows.append({"tokens": tokens, "ours_us": t_ours * 1e6, "tiles_us": t_tiles * 1e6, "tk_us": t_tk * 1e6,
                     "timed_by": f"{how_ours}/{how_tk}", "ours_tflops": flops / t_ours / 1e12,
                     "tk_tflops": flops / t_tk / 1e12, "speedup": t_tk / t_ours, "rel_err": err})
        print(rows[-1], flush=True)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| tokens | ours (us) | ours, Triton tiles past 16 rows (us) | triton-kernels (us) | timed by | "
             "ours TFLOP/s | triton-kernels TFLOP/s | x triton-kernels | rel. L2 diff |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['tokens']} | {r['ours_us']:.1f} | {r['tiles_us']:.1f} | {r['tk_us']:.1f} | {r['timed_by']} | "
                     f"{r['ours_tflops']:.1f} | {r['tk_tflops']:.1f} | {r['speedup']:.2f} | {r['rel_err']:.1e} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", default="1,8,64,1024,4096")
    args = parser.parse_args()
    rows = run([int(t) for t in args.tokens.split(",")])
    print(f"{torch.cuda.get_device_name()}: MoE experts (route, gate_up + SwiGLU, down, combine), "
          f"{EXPERTS} experts, top-{TOP_K}, hidden {HIDDEN}")
    print(table(rows))


if __name__ == "__main__":
    main()

"""The check shared by the CPU (interpreter) and GPU tests of kernels/norm_route.py."""

import torch

from kernels.gemv import gemv_reference
from kernels.norm_route import NormRoute, norm_route_reference


def random_norm_route(hidden: int, experts: int, k: int, device, ties: bool = False) -> NormRoute:
    """A NormRoute over random bf16 weights; with ties, experts 2i and 2i+1 alike (every logit tied in pairs)."""
    router_w, router_b = torch.randn(experts, hidden, device=device) / hidden**0.5, torch.randn(experts, device=device)
    if ties:
        router_w[1::2], router_b[1::2] = router_w[0::2], router_b[0::2]
    return NormRoute(torch.randn(hidden, device=device).to(torch.bfloat16), router_w.to(torch.bfloat16),
                     router_b.to(torch.bfloat16), k, 1e-5)


def check_norm_route(fused, attn: torch.Tensor, resid: torch.Tensor, exact: bool = True, outputs=None) -> None:
    """fused(attn, resid) (or the `outputs` a graph replay of it left) against the references: h exactly
    (within one bf16 step with exact=False: Triton's interpreter truncates float32 to bf16 where the GPU rounds
    to nearest), y and the router logits within bf16 rounding; then, from the logits the kernel computed (near-ties in bf16 may fall either way against the
    reference's), the top-k exactly (ties: lowest expert first), its softmax, and a routing that places every
    (token, choice) in its expert's group exactly once."""
    y, h, routing, weights = fused(attn, resid) if outputs is None else outputs
    ry, rh, _, _ = norm_route_reference(attn, resid, fused.norm_w, fused.eps, fused.router_w, fused.router_b, fused.k)
    tokens, k = attn.shape[0], fused.k
    if exact:
        assert torch.equal(h, rh), "residual add differs"
    else:
        assert bool(((h.double() - rh.double()).abs() <= rh.double().abs() * 2**-7).all()), "residual add differs"
    err = float((y.double() - ry.double()).norm() / ry.double().norm())
    assert err <= 1e-2, f"norm relative error {err}"
    ref_logits = gemv_reference(ry, fused.router_w, fused.router_b).double().cpu()
    logits = fused.logits[:tokens].double().cpu()
    lerr = float((logits - ref_logits).norm() / ref_logits.norm())
    assert lerr <= 1e-2, f"router logits relative error {lerr}"

    top = torch.sort(logits, dim=-1, descending=True, stable=True)
    ids = top.indices[:, :k]
    assert torch.allclose(weights.cpu().double(), torch.softmax(top.values[:, :k], dim=-1), atol=1e-5), weights
    offsets = routing.offsets.cpu().long()
    pos, src = routing.pos.cpu().long().view(tokens, k), routing.src.cpu().long()
    assert offsets[0] == 0 and offsets[-1] == tokens * k, offsets
    assert torch.equal(routing.counts.cpu().long(), offsets[1:] - offsets[:-1])
    assert sorted(pos.flatten().tolist()) == list(range(tokens * k)), "slots are not a permutation"
    assert torch.equal(src[pos], torch.arange(tokens)[:, None].expand(tokens, k)), "src does not invert pos"
    placed = torch.bucketize(pos, offsets[1:], right=True)  # [T, k]: the group each (token, choice) landed in
    assert torch.equal(placed, ids), (placed, ids)

"""The fused decode MoE entry (kernels/norm_route.py) compiled, at gpt-oss shapes, eagerly and replayed in a CUDA
graph with its outputs poisoned before each replay (GPU only)."""

import pytest
import torch

from norm_route_checks import check_norm_route, random_norm_route

pytestmark = pytest.mark.gpu

SHAPES = [(2880, 32, 4), (2880, 128, 4), (64, 8, 4), (200, 20, 3)]  # (hidden, experts, k): 20b, 120b, tiny, odd


def _inputs(tokens, hidden):
    attn = torch.randn(tokens, hidden, device="cuda").to(torch.bfloat16)
    return attn, (8 * torch.randn(tokens, hidden, device="cuda")).to(torch.bfloat16)


@pytest.mark.parametrize("tokens", [1, 2, 3, 4])
@pytest.mark.parametrize("hidden,experts,k", SHAPES)
def test_norm_route(tokens, hidden, experts, k):
    fused = random_norm_route(hidden, experts, k, "cuda")
    for _ in range(3):  # fresh inputs each call; the ticket must come back to zero
        check_norm_route(fused, *_inputs(tokens, hidden))
        assert int(fused.ticket) == 0


@pytest.mark.parametrize("tokens", [1, 4])
def test_norm_route_graph_replay(tokens):
    fused = random_norm_route(2880, 32, 4, "cuda")
    attn, resid = _inputs(tokens, 2880)
    fused(attn, resid)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y, h, routing, weights = fused(attn, resid)
    for _ in range(4):
        new_attn, new_resid = _inputs(tokens, 2880)
        attn.copy_(new_attn)
        resid.copy_(new_resid)
        for o in (y, h, routing.counts, routing.offsets, routing.pos, routing.src, weights):
            o.fill_(-1 if o.dtype == torch.int32 else float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        check_norm_route(fused, attn, resid, outputs=(y, h, routing, weights))
        assert int(fused.ticket) == 0

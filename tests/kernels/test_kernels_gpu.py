"""Every CuTeDSL kernel against its torch reference at gpt-oss shapes and odd sizes (GPU only)."""

import pytest
import torch

from kernel_checks import poisoned, rel_err

pytestmark = pytest.mark.gpu

TOL = 1e-2
HIDDEN_20B = 2880
TOKENS = [1, 7, 64, 1001, 4096]  # 1 token, non-multiples of the 4-row and 256-thread tiles, 4k


@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("hidden", [HIDDEN_20B, 64, 136])
@pytest.mark.parametrize("weighted,fused", [(True, True), (True, False), (False, False)])
@pytest.mark.parametrize("rows_per_warp", [1, 2])
def test_rmsnorm(tokens, hidden, weighted, fused, rows_per_warp):
    from kernels.rmsnorm import rmsnorm, rmsnorm_reference

    x = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16) * 3
    res = torch.randn_like(x) if fused else None
    w = (torch.rand(hidden, device="cuda") + 0.5).to(torch.bfloat16) if weighted else None
    out = poisoned(tokens, hidden)
    y, h = rmsnorm(x, w, 1e-5, residual=res, out=out, rows_per_warp=rows_per_warp)
    assert y.data_ptr() == out.data_ptr()
    ref_y, ref_h = rmsnorm_reference(x, w, 1e-5, residual=res)
    assert rel_err(y, ref_y) <= TOL
    if fused:
        assert rel_err(h, ref_h) <= TOL


@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("hidden", [HIDDEN_20B, 136])
@pytest.mark.parametrize("weighted", [True, False])
def test_combine_rmsnorm(tokens, hidden, weighted):
    """The fused MoE combine + residual + RMSNorm against its reference and against the two kernels it replaces."""
    from kernels.moe_dispatch import combine
    from kernels.rmsnorm import combine_rmsnorm, combine_rmsnorm_reference, rmsnorm

    k, experts = 4, 32
    _, r = _route(tokens, experts, k)
    ys = torch.randn(tokens * k, hidden, device="cuda", dtype=torch.bfloat16) * 2
    weights = torch.softmax(torch.randn(tokens, k, device="cuda"), -1)
    res = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16) * 3
    w = (torch.rand(hidden, device="cuda") + 0.5).to(torch.bfloat16) if weighted else None
    pos = r.pos.view(tokens, k)
    y, h = combine_rmsnorm(ys, pos, weights, res, w, 1e-5)
    ref_y, ref_h = combine_rmsnorm_reference(ys, pos, weights, res, w, 1e-5)
    assert rel_err(y, ref_y) <= TOL and rel_err(h, ref_h) <= TOL
    two_y, two_h = rmsnorm(combine(ys, r, weights), w, 1e-5, residual=res)
    assert rel_err(y, two_y) <= TOL and rel_err(h, two_h) <= TOL


@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("inter", [2880, 72])
def test_swiglu(tokens, inter):
    from kernels.swiglu import swiglu, swiglu_reference

    x = torch.randn(tokens, 2 * inter, device="cuda", dtype=torch.bfloat16) * 4  # reaches the clamp at 7
    out = poisoned(tokens, inter)
    y = swiglu(x, 1.702, 7.0, out=out)
    assert rel_err(y, swiglu_reference(x, 1.702, 7.0)) <= TOL
    assert (x.float() > 7).any()  # the clamp was exercised


@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("experts,k", [(32, 4), (128, 4), (8, 2)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_router(tokens, experts, k, dtype):
    from kernels.router import router_reference, router_topk

    logits = torch.randn(tokens, experts, device="cuda", dtype=dtype)
    out = (poisoned(tokens, k, dtype=torch.int32), poisoned(tokens, k, dtype=torch.float32))
    ids, w = router_topk(logits, k, out=out)
    ref_ids, ref_w = router_reference(logits, k)
    # ties in bf16 may pick another expert of the same logit: compare the chosen logits
    chosen = logits.float().gather(1, ids.long())
    ref_vals = logits.float().gather(1, ref_ids.long())
    assert torch.equal(chosen, ref_vals)
    assert (ids.sort(1).values.diff(dim=1) > 0).all()  # k distinct experts
    assert rel_err(w, ref_w) <= 1e-5


def _route(tokens, experts, k):
    from kernels.moe_dispatch import Routing, route

    ids = torch.stack([torch.randperm(experts, device="cuda")[:k] for _ in range(tokens)]).to(torch.int32)
    n = tokens * k
    out = Routing(*(poisoned(m, dtype=torch.int32) for m in (experts, experts + 1, n, n)), k)
    return ids, route(ids, experts, out=out)


@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("experts", [32, 128])
def test_route(tokens, experts):
    from kernels.moe_dispatch import route_reference

    k = 4
    ids, r = _route(tokens, experts, k)
    counts, offsets = route_reference(ids, experts)
    assert torch.equal(r.counts, counts) and torch.equal(r.offsets, offsets)
    n = tokens * k
    assert torch.equal(r.pos.sort().values, torch.arange(n, device="cuda", dtype=torch.int32))
    flat = torch.arange(n, device="cuda")
    assert torch.equal(r.src[r.pos.long()].long(), flat // k)  # slot of (t, j) holds token t
    slot_expert = torch.empty(n, dtype=torch.int32, device="cuda")
    slot_expert[r.pos.long()] = ids.reshape(-1)
    assert (slot_expert.diff() >= 0).all()  # grouped by expert, in expert order


@pytest.mark.parametrize("tokens", [1, 7, 64, 256])
@pytest.mark.parametrize("experts,k", [(32, 4), (128, 4)])
def test_route_topk(tokens, experts, k):
    """The fused top-k + route gives router_topk's choices and weights and a valid routing of them."""
    from kernels.moe_dispatch import Routing, route_reference, route_topk
    from kernels.router import router_reference

    logits = torch.randn(tokens, experts, device="cuda", dtype=torch.bfloat16)
    n = tokens * k
    out = Routing(*(poisoned(m, dtype=torch.int32) for m in (experts, experts + 1, n, n)), k)
    r, w = route_topk(logits, k, out=out)
    ref_ids, ref_w = router_reference(logits, k)
    # the ids in slot order: slot pos[t, j] holds token t's j-th choice, whose expert is the slot's group
    group_of_slot = torch.repeat_interleave(torch.arange(experts, device="cuda"), r.counts.long(), output_size=n)
    ids = group_of_slot[r.pos.long()].view(tokens, k)
    assert torch.equal(logits.float().gather(1, ids), logits.float().gather(1, ref_ids.long()))
    assert rel_err(w, ref_w) <= 1e-5
    counts, offsets = route_reference(ids.to(torch.int32), experts)
    assert torch.equal(r.counts, counts) and torch.equal(r.offsets, offsets)
    assert torch.equal(r.pos.sort().values, torch.arange(n, device="cuda", dtype=torch.int32))
    assert torch.equal(r.src[r.pos.long()].long(), torch.arange(n, device="cuda") // k)


@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("experts", [32, 128])
def test_dispatch_combine_moe(tokens, experts):
    """dispatch -> per-expert function -> combine equals the plain torch MoE."""
    from kernels.moe_dispatch import combine, dispatch, moe_reference

    k, hidden = 4, HIDDEN_20B
    x = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16)
    ids, r = _route(tokens, experts, k)
    weights = torch.softmax(torch.randn(tokens, k, device="cuda"), -1)
    scale = torch.randn(experts, hidden, device="cuda")
    expert_fn = lambda e, rows: rows.float() * scale[e]  # noqa: E731

    xs = dispatch(x, r, out=poisoned(tokens * k, hidden))
    assert torch.equal(xs, x[r.src.long()])
    ys = torch.empty_like(xs)
    bounds = r.offsets.tolist()
    for e in range(experts):
        lo, hi = bounds[e], bounds[e + 1]
        ys[lo:hi] = expert_fn(e, xs[lo:hi]).to(ys.dtype)
    y = combine(ys, r, weights, out=poisoned(tokens, hidden))
    assert rel_err(y, moe_reference(x, ids, weights, expert_fn)) <= TOL


@pytest.mark.parametrize("bulk", [True, False])
@pytest.mark.parametrize("hidden", [8256, 32776])
def test_dispatch_wide_rows(bulk, hidden):
    """Rows of 1032 vectors (past the most threads one CTA has) and of 64 KiB (past BULK_ROW_BYTES: the bulk
    form hands them to the vector one), in both forms: every row still lands in its slots."""
    from kernels.moe_dispatch import dispatch

    tokens = 5
    x = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16)
    _, r = _route(tokens, 32, 4)
    assert torch.equal(dispatch(x, r, out=poisoned(tokens * 4, hidden), bulk=bulk), x[r.src.long()])


@pytest.mark.parametrize("tokens", [1, 7, 4096])
def test_embedding(tokens):
    from kernels.embedding import embedding, embedding_reference

    table = torch.randn(201088, HIDDEN_20B, device="cuda", dtype=torch.bfloat16)
    ids = torch.randint(0, table.shape[0], (tokens,), device="cuda")
    ids[0] = table.shape[0] - 1  # the last row is reachable
    y = embedding(table, ids, out=poisoned(tokens, HIDDEN_20B))
    assert torch.equal(y, embedding_reference(table, ids))

"""Decode's MoE entry in one kernel (Triton): the post-attention residual add and RMSNorm, the router's
logits, its top-k + softmax and the routing into expert groups, for a few tokens.

    h = attn + resid                              [T, H] bf16 (the new residual)
    y = h * rsqrt(mean(h^2) + eps) * norm_w       [T, H] bf16 (the experts' input)
    logits = y W_r^T + b_r                        [T, E], rounded to bf16 as the router's linear stores it
    ids, weights = top-k, softmax over the k      as kernels/router.py (ties: lowest expert first)
    routing = counts, offsets, pos, src           as kernels/moe_dispatch.py's route

At batch 1 these were three launches a layer (rmsnorm, the router GEMV, route_topk), each a few
microseconds of latency around almost no bytes. Here program e (one per expert) recomputes the norm
of the T rows (a few KB from L2), takes router row e's dot product and stores logit [t, e]; the last
program to finish (an atomic ticket) reads every logit and does the top-k and the routing. Program 0
also stores h and y. The ticket counter is zeroed again by the last program, so a CUDA graph
replays it as is.
"""

from __future__ import annotations

import os

import torch

from kernels.moe_dispatch import empty_routing
from kernels.pdl import pdl_enabled

try:  # optional: importing this module must work where Triton is absent
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only without triton
    triton = tl = None

_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

MAX_TOKENS = 4  # decode's GEMV path (kernels/moe_mxfp4.GEMV_ROWS routed rows at top-4)
MAX_EXPERTS = 256


def norm_route_enabled() -> bool:
    """Whether the cuda backend fuses decode's norm and routing: Triton is there and ROSE_FUSED_ROUTE is not 0
    (0 keeps the three kernels, for A/B timing)."""
    return triton is not None and os.environ.get("ROSE_FUSED_ROUTE", "1") != "0"


def norm_route_fits(tokens: int, hidden: int, num_experts: int, k: int) -> bool:
    """Whether `norm_route` takes this step (few tokens, a router that fits one program's registers)."""
    return 1 <= tokens <= MAX_TOKENS and num_experts <= MAX_EXPERTS and k <= num_experts and hidden <= 8192


class NormRoute:
    """One layer's fused norm + router + routing: holds the ticket counter and the logits scratch."""

    def __init__(self, norm_w: torch.Tensor, router_w: torch.Tensor, router_b: torch.Tensor, k: int, eps: float):
        self.norm_w, self.router_w, self.router_b, self.k, self.eps = norm_w, router_w, router_b, k, eps
        self.num_experts, self.hidden = router_w.shape
        self.ticket = torch.zeros(1, dtype=torch.int32, device=router_w.device)
        self.logits = torch.empty(MAX_TOKENS, self.num_experts, dtype=torch.float32, device=router_w.device)

    def fits(self, tokens: int) -> bool:
        return norm_route_fits(tokens, self.hidden, self.num_experts, self.k)

    def __call__(self, attn: torch.Tensor, resid: torch.Tensor):
        """attn, resid [T, H] bf16 -> (y, h [T, H] bf16, Routing, weights [T, k] float32)."""
        return norm_route(attn, resid, self.norm_w, self.eps, self.router_w, self.router_b, self.k,
                          self.ticket, self.logits)


def norm_route_reference(attn, resid, norm_w, eps, router_w, router_b, k):
    """Plain torch: (y, h, ids [T, k] int32, weights [T, k] float32) from the separate steps' references."""
    from kernels.gemv import gemv_reference
    from kernels.rmsnorm import rmsnorm_reference
    from kernels.router import router_reference

    y, h = rmsnorm_reference(attn, norm_w, eps, resid)
    ids, weights = router_reference(gemv_reference(y, router_w, router_b), k)
    return y, h, ids, weights


def norm_route(attn, resid, norm_w, eps, router_w, router_b, k, ticket, logits):
    """The fused kernel. ticket: int32 [1], zero between calls; logits: float32 scratch [>= T, E]."""
    if triton is None:
        raise ImportError("norm_route needs Triton: pip install triton (it ships with CUDA torch)")
    t, hidden = attn.shape
    e = router_w.shape[0]
    if not norm_route_fits(t, hidden, e, k):
        raise ValueError(f"norm_route takes 1..{MAX_TOKENS} tokens, <= {MAX_EXPERTS} experts; got {t}, {e}")
    for name, x in (("attn", attn), ("resid", resid)):
        if x.dtype != torch.bfloat16 or not x.is_contiguous() or tuple(x.shape) != (t, hidden):
            raise ValueError(f"{name} must be contiguous bf16 [{t}, {hidden}]")
    if not attn.is_cuda and not _INTERPRETED:
        raise RuntimeError("norm_route on CPU tensors runs only under Triton's interpreter (TRITON_INTERPRET=1)")
    dev = attn.device
    y, h = torch.empty_like(attn), torch.empty_like(attn)
    routing = empty_routing(t, k, e, dev)
    weights = torch.empty(t, k, dtype=torch.float32, device=dev)
    pdl = attn.is_cuda and pdl_enabled()
    n_pairs = t * k
    _norm_route_kernel[(e,)](
        attn, resid, norm_w, router_w, router_b, y, h, logits, ticket, weights,
        routing.counts, routing.offsets, routing.pos, routing.src, eps,
        T=t, H=hidden, E=e, K=k, BH=triton.next_power_of_2(hidden), BE=triton.next_power_of_2(e),
        BP=triton.next_power_of_2(n_pairs), PDL=pdl, num_warps=8, launch_pdl=pdl,
    )
    return y, h, routing, weights


if triton is not None:

    @triton.jit
    def _norm_route_kernel(attn_ptr, resid_ptr, norm_w_ptr, router_w_ptr, router_b_ptr, y_ptr, h_ptr, logits_ptr,
                           ticket_ptr, weights_ptr, counts_ptr, offsets_ptr, pos_ptr, src_ptr, eps,
                           T: tl.constexpr, H: tl.constexpr, E: tl.constexpr, K: tl.constexpr, BH: tl.constexpr,
                           BE: tl.constexpr, BP: tl.constexpr, PDL: tl.constexpr):
        expert = tl.program_id(0)
        cols = tl.arange(0, BH)
        in_h = cols < H
        w_row = tl.load(router_w_ptr + expert * H + cols, mask=in_h, other=0.0).to(tl.float32)
        norm_w = tl.load(norm_w_ptr + cols, mask=in_h, other=0.0).to(tl.float32)
        bias = tl.load(router_b_ptr + expert).to(tl.float32)
        if PDL:  # the router row and norm weights are loading while the kernel before finishes (kernels/pdl.py)
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        for t in tl.static_range(T):
            a = tl.load(attn_ptr + t * H + cols, mask=in_h, other=0.0).to(tl.float32)
            r = tl.load(resid_ptr + t * H + cols, mask=in_h, other=0.0).to(tl.float32)
            h = (a + r).to(tl.bfloat16)  # the residual stream is bf16, as in the torch model
            hf = h.to(tl.float32)
            inv = tl.rsqrt(tl.sum(hf * hf, axis=0) / H + eps)
            y = (hf * inv * norm_w).to(tl.bfloat16)
            if expert == 0:
                tl.store(h_ptr + t * H + cols, h, mask=in_h)
                tl.store(y_ptr + t * H + cols, y, mask=in_h)
            logit = (tl.sum(y.to(tl.float32) * w_row, axis=0) + bias).to(tl.bfloat16)
            tl.store(logits_ptr + t * E + expert, logit.to(tl.float32))
        # the last program to take a ticket sees every logit: the acq_rel atomic after the CTA's barrier
        # orders this program's stores before it, as a __threadfence() would
        tl.debug_barrier()
        ticket = tl.atomic_add(ticket_ptr, 1, sem="acq_rel", scope="gpu")
        if ticket == E - 1:
            tl.store(ticket_ptr, 0)  # zero again for the next call (a graph replays this kernel as captured)
            _route_last(logits_ptr, weights_ptr, counts_ptr, offsets_ptr, pos_ptr, src_ptr, T, E, K, BE, BP)

    @triton.jit
    def _route_last(logits_ptr, weights_ptr, counts_ptr, offsets_ptr, pos_ptr, src_ptr,
                    T: tl.constexpr, E: tl.constexpr, K: tl.constexpr, BE: tl.constexpr, BP: tl.constexpr):
        """Top-k + softmax of every token, then counts, offsets, pos and src as moe_dispatch.route writes them."""
        experts = tl.arange(0, BE)
        pairs = tl.arange(0, BP)  # pair i = (token i // K, choice i % K)
        pair_ids = tl.full((BP,), BE, tl.int32)  # padding pairs hold no expert
        for t in tl.static_range(T):
            # .cg: read at L2, where the other programs' stores are (this SM's L1 may hold an older call's)
            vals = tl.load(logits_ptr + t * E + experts, mask=experts < E, other=float("-inf"),
                           cache_modifier=".cg")
            top = tl.full((BP,), float("-inf"), tl.float32)
            for j in tl.static_range(K):
                best = tl.max(vals, axis=0)
                pick = tl.min(tl.where(vals == best, experts, BE), axis=0)  # ties: the lowest expert
                vals = tl.where(experts == pick, float("-inf"), vals)
                pair_ids = tl.where(pairs == t * K + j, pick, pair_ids)
                top = tl.where(pairs == t * K + j, best, top)
            mine = (pairs >= t * K) & (pairs < t * K + K)
            p = tl.where(mine, tl.exp(top - tl.max(top, axis=0)), 0.0)
            tl.store(weights_ptr + pairs, p / tl.sum(p, axis=0), mask=mine)
        n: tl.constexpr = T * K
        valid = pairs < n
        hit = (pair_ids[:, None] == experts[None, :]) & valid[:, None]  # [BP, BE]
        counts = tl.sum(hit.to(tl.int32), axis=0)
        starts = tl.cumsum(counts, axis=0) - counts
        tl.store(counts_ptr + experts, counts, mask=experts < E)
        tl.store(offsets_ptr + experts, starts, mask=experts < E)
        tl.store(offsets_ptr + E, n)
        # a pair's rank in its expert group: the earlier pairs routed to the same expert
        same = (pair_ids[:, None] == pair_ids[None, :]) & (pairs[None, :] < pairs[:, None]) & valid[None, :]
        rank = tl.sum(same.to(tl.int32), axis=1)
        slot = tl.sum(tl.where(hit, starts[None, :], 0), axis=1) + rank
        tl.store(pos_ptr + pairs, slot, mask=valid)
        tl.store(src_ptr + slot, pairs // K, mask=valid)


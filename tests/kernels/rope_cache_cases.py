"""Cases for kernels/rope_cache.py against its torch reference: `python rope_cache_cases.py cpu|cuda`.

Run as a script (the CPU test starts it under TRITON_INTERPRET=1) or imported by the GPU test.
Caches start as NaN: every written slot must be finite and equal the reference, every other
slot must still be NaN.
"""

import os
import sys

import torch

from kernels.rope_cache import rope_and_cache, rope_and_cache_reference

# (heads, kv_heads, head_dim, tokens, blocks, block_size)
SMALL = [(4, 2, 16, 5, 6, 4), (8, 1, 64, 3, 2, 4), (3, 3, 12, 2, 3, 2), (64, 8, 64, 1, 2, 16)]
GPT_OSS = [(64, 8, 64, 1, 64, 16), (64, 8, 64, 37, 64, 16), (64, 8, 64, 256, 64, 16), (64, 8, 64, 1000, 128, 16)]


def check(heads, kv_heads, d, t, blocks, bs, device):
    qkv = torch.randn(t, (heads + 2 * kv_heads) * d, device=device).to(torch.bfloat16)
    pos = torch.randint(0, 100000, (t,), device=device).float()
    inv = 1.0 / (150000 ** (torch.arange(d // 2, device=device).float() / (d // 2)))
    cos, sin = (pos[:, None] * inv).cos(), (pos[:, None] * inv).sin()
    slots = torch.randperm(blocks * bs, device=device)[:t]
    nan = lambda: torch.full((blocks, bs, kv_heads, d), float("nan"), dtype=torch.bfloat16, device=device)  # noqa: E731
    k_ours, v_ours, k_ref, v_ref = nan(), nan(), nan(), nan()
    q = torch.full((t, heads, d), float("nan"), dtype=torch.bfloat16, device=device)
    rope_and_cache(qkv, cos, sin, slots, k_ours, v_ours, heads, kv_heads, d, out=q)
    q_ref = rope_and_cache_reference(qkv, cos, sin, slots, k_ref, v_ref, heads, kv_heads, d)
    case = (heads, kv_heads, d, t)
    assert not q.isnan().any(), (case, "q rows left unwritten")
    assert rel(q, q_ref) <= 1e-2, (case, "q", rel(q, q_ref))
    others = torch.ones(blocks * bs, dtype=torch.bool, device=device)
    others[slots] = False
    for name, ours, ref in (("k", k_ours, k_ref), ("v", v_ours, v_ref)):
        mine, want = ours.view(-1, kv_heads, d), ref.view(-1, kv_heads, d)
        assert not mine[slots].isnan().any(), (case, name, "slot left unwritten")
        assert rel(mine[slots], want[slots]) <= 1e-2, (case, name, rel(mine[slots], want[slots]))
        assert mine[others].isnan().all(), (case, name, "wrote outside its slots")


def rel(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


if __name__ == "__main__":
    device = sys.argv[1]
    torch.manual_seed(int(os.environ.get("SEED", "0")))
    for case in SMALL + (GPT_OSS if device == "cuda" else []):
        check(*case, device=device)
    print("ok")

"""Cases for kernels/qkv_rope.py: `python qkv_rope_cases.py cpu|cuda`.

Run as a script (the CPU test starts it under TRITON_INTERPRET=1) or imported by the GPU test. The fused
projection must equal kernels/gemv.py's GEMV followed by kernels/rope_cache.py bit for bit (q, and the k and
v it writes), be within bf16 rounding of the float32 torch reference, and leave every other cache slot as
it was (NaN).
"""

import os
import sys

import torch

from kernels.gemv import gemv, gemv_reference, pick_config
from kernels.qkv_rope import qkv_rope_cache
from kernels.rope_cache import rope_and_cache, rope_and_cache_reference

# (heads, kv_heads, head_dim, hidden, tokens, blocks, block_size): the GEMV takes one row below K 4096, two from it
SMALL = [(4, 2, 16, 96, 1, 6, 4), (3, 1, 20, 200, 1, 3, 2), (2, 1, 16, 4096, 2, 4, 4)]
GPT_OSS = [(64, 8, 64, 2880, 1, 64, 16), (64, 8, 64, 2880, 1, 8, 16)]


def rel(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def check(heads, kv_heads, d, hidden, t, blocks, bs, device):
    n = (heads + 2 * kv_heads) * d
    x = torch.randn(t, hidden, device=device).to(torch.bfloat16)
    w = (torch.randn(n, hidden, device=device) / hidden**0.5).to(torch.bfloat16)
    b = torch.randn(n, device=device).to(torch.bfloat16)
    pos = torch.randint(0, 100000, (t,), device=device).float()
    inv = 1.0 / (150000 ** (torch.arange(d // 2, device=device).float() / (d // 2)))
    cos, sin = (pos[:, None] * inv).cos(), (pos[:, None] * inv).sin()
    slots = torch.randperm(blocks * bs, device=device)[:t]
    nan = lambda: torch.full((blocks, bs, kv_heads, d), float("nan"), dtype=torch.bfloat16, device=device)  # noqa: E731
    k_ours, v_ours, k_two, v_two, k_ref, v_ref = nan(), nan(), nan(), nan(), nan(), nan()
    q = qkv_rope_cache(x, w, b, cos, sin, slots, k_ours, v_ours, heads, kv_heads, d)
    qkv = gemv(x, w, b, config=pick_config(t, n, hidden))
    q_two = rope_and_cache(qkv, cos, sin, slots, k_two, v_two, heads, kv_heads, d)
    q_ref = rope_and_cache_reference(gemv_reference(x, w, b), cos, sin, slots, k_ref, v_ref, heads, kv_heads, d)
    case = (heads, kv_heads, d, hidden, t)
    assert torch.equal(q, q_two), (case, "q differs from the GEMV + rope_cache")
    assert rel(q, q_ref) <= 1e-2, (case, "q", rel(q, q_ref))
    others = torch.ones(blocks * bs, dtype=torch.bool, device=device)
    others[slots] = False
    for name, ours, two, ref in (("k", k_ours, k_two, k_ref), ("v", v_ours, v_two, v_ref)):
        mine = ours.view(-1, kv_heads, d)
        assert torch.equal(mine[slots], two.view(-1, kv_heads, d)[slots]), (case, name, "differs from the two kernels")
        assert rel(mine[slots], ref.view(-1, kv_heads, d)[slots]) <= 1e-2, (case, name)
        assert mine[others].isnan().all(), (case, name, "wrote outside its slots")


if __name__ == "__main__":
    torch.manual_seed(int(os.environ.get("SEED", "0")))
    for case in SMALL if sys.argv[1] == "cpu" else SMALL + GPT_OSS:
        check(*case, device=sys.argv[1])
    print("ok")

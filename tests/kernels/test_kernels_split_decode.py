"""kernels/split_decode.py run by Triton's CPU interpreter on small shapes (the GPU tests take the real ones).

Every split count must give the reference's attention: empty splits (short contexts, windows), a
one-key sequence, a context crossing pages in random order, the sinks in the row sum."""

import textwrap

import pytest
from kernel_checks import run_in_triton_interpreter

pytest.importorskip("triton", reason="Triton has wheels for Linux only (the test extra installs it there)")

CASES = textwrap.dedent(
    """
    import os, torch
    from kernels.split_decode import SplitScratch, split_decode, split_decode_reference

    torch.manual_seed(int(os.environ["SEED"]))
    heads, kv_heads, dim, page, blocks = 12, 2, 32, 16, 48  # 6 query heads a kv head: the merge pads to 8
    k = torch.randn(blocks, page, kv_heads, dim).to(torch.bfloat16)
    v = torch.randn_like(k)
    lengths = torch.tensor([1, 17, 64, 200, 333], dtype=torch.int32)
    t = len(lengths)
    table = torch.stack([torch.randperm(blocks)[:21] for _ in range(t)]).to(torch.int32)
    q = torch.randn(t, heads, dim).to(torch.bfloat16)
    sinks = torch.randn(heads) * 2
    for window in (None, 40):
        ref = split_decode_reference(q, k, v, table, lengths, sinks, window).double()
        no_sink = split_decode_reference(q, k, v, table, lengths, torch.full_like(sinks, -1e30), window).double()
        assert float((no_sink - ref).norm() / ref.norm()) > 3e-2  # the sinks matter at these sizes
        for splits in (1, 2, 8, 32):
            scratch = SplitScratch(t, heads, kv_heads, dim, splits, "cpu")
            out = torch.full((t, heads, dim), float("nan"), dtype=torch.bfloat16)
            split_decode(q, k, v, table, lengths, sinks, window, scratch, out)
            err = float((out.double() - ref).norm() / ref.norm())
            assert err <= 1e-2, (window, splits, err)
            assert not scratch.tickets.any(), (window, splits)
    print("ok")
    """
)


@pytest.mark.parametrize("merge", ["kernel", "fused"])
def test_split_decode_in_triton_interpreter(merge, monkeypatch):
    monkeypatch.setenv("ROSE_SPLIT_MERGE", merge)  # read at import, in the child
    run_in_triton_interpreter(CASES, timeout=300)

"""The fused decode MoE entry (norm + router + top-k + routing) in Triton's CPU interpreter, against the separate
steps' references (in a child process: the interpreter is chosen when Triton is imported). The GPU test runs it
compiled at gpt-oss shapes."""

import textwrap

import pytest
from kernel_checks import run_in_triton_interpreter

pytest.importorskip("triton", reason="Triton has wheels for Linux only (the test extra installs it there)")

CASES = textwrap.dedent(
    """
    import os, sys, torch
    sys.path.insert(0, "tests/kernels")
    from norm_route_checks import check_norm_route, random_norm_route

    torch.manual_seed(int(os.environ["SEED"]))
    for tokens, hidden, experts, k, ties in [(1, 96, 32, 4, False), (3, 100, 8, 2, False), (4, 64, 20, 4, False),
                                             (2, 40, 128, 4, False), (2, 64, 16, 4, True)]:
        fused = random_norm_route(hidden, experts, k, "cpu", ties)  # ties: the lower expert must win
        for call in range(2):  # the ticket is back at zero after each call
            attn = torch.randn(tokens, hidden).to(torch.bfloat16)
            resid = (4 * torch.randn(tokens, hidden)).to(torch.bfloat16)
            check_norm_route(fused, attn, resid, exact=False)
            assert int(fused.ticket) == 0, (tokens, experts, call)
    print("ok")
    """
)


def test_norm_route_in_triton_interpreter():
    run_in_triton_interpreter(CASES, timeout=300)

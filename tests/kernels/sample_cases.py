"""Checks of kernels/sample.py shared by the interpreter test (CPU) and the GPU test."""

import torch

from kernels.sample import gumbel_sample, gumbel_sample_reference


def check_greedy_and_finite(device: str, vocab: int, rows: int) -> None:
    """Greedy rows are torch.argmax (first of a tie); a row with a non-finite logit is flagged, token 0."""
    x = torch.randn(rows, vocab, device=device) * 4
    bad = {0: float("nan"), rows // 2: float("inf"), rows - 1: float("-inf")} if rows >= 3 else {}
    for row, value in bad.items():
        x[row, vocab // 3] = value
    if rows >= 2:  # a tie across two chunks: the first column wins
        x[1] = 0.0
        x[1, vocab - 1] = x[1, 7] = 5.0
    out = gumbel_sample(x, torch.ones(rows, device=device), torch.zeros(rows, device=device), seed=3)
    finite = torch.tensor([row not in bad for row in range(rows)], device=device)
    assert out.dtype == torch.int64 and out.shape == (2, rows)
    assert out[1].tolist() == finite.long().tolist()
    assert torch.equal(out[0], torch.where(finite, x.argmax(dim=-1), 0))
    ones, zeros = torch.ones(rows, device=device), torch.zeros(rows, device=device)
    assert torch.equal(out, gumbel_sample_reference(x, ones, zeros))


def check_distribution(device: str, vocab: int, draws: int, temperature: float, top: int = 12, limit: float = 45.0) -> float:
    """Many rows of the same logits: the draws' histogram against softmax(x / T) (chi-square over the
    `top` likeliest tokens and the rest, `top` degrees of freedom; limit: the statistic's bound, about
    p = 1e-5); the mixed-in greedy rows stay argmaxes. Returns the statistic."""
    logits = torch.randn(vocab, device=device) * 2
    x = logits.repeat(draws, 1)
    greedy = torch.arange(draws, device=device) % 5 == 0
    scale = torch.where(greedy, 1.0, 1.0 / temperature)
    noise = torch.where(greedy, 0.0, 1.0)
    out = gumbel_sample(x, scale, noise, seed=int(torch.randint(0, 2**62, ())))
    assert out[1].all()
    assert (out[0][greedy] == logits.argmax()).all()
    drawn = out[0][~greedy]
    p = torch.softmax(logits.double() / temperature, dim=0)
    top = p.argsort(descending=True)[:top]
    counts = torch.stack([(drawn == t).sum() for t in top]).double()
    expected = p[top] * drawn.numel()
    rest, rest_expected = drawn.numel() - counts.sum(), drawn.numel() - expected.sum()
    chi2 = float(((counts - expected) ** 2 / expected).sum() + (rest - rest_expected) ** 2 / rest_expected)
    assert chi2 < limit, (chi2, counts.tolist(), expected.tolist())
    return chi2


def check_seeds(device: str, vocab: int) -> None:
    """The same seed draws the same tokens; another seed other tokens."""
    x = torch.zeros(64, vocab, device=device)  # uniform: any column is as likely
    ones = torch.ones(64, device=device)
    a, b, c = (gumbel_sample(x, ones, ones, seed=s) for s in (11, 11, 12))
    assert torch.equal(a, b)
    assert (a[0] != c[0]).sum() > 32
    assert len(set(a[0].tolist())) > 32

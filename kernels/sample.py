"""One token per row of logits by the Gumbel-max trick, with the finite check, in two kernels (Triton).

    logits  [rows, V]  float32 (the model's last-token logits; read once)
    scale   [rows]     float32  1 / temperature (1 for a greedy row)
    noise   [rows]     float32  1 to draw, 0 for greedy (the argmax)
    out     [2, rows]  int64    row 0: the token (0 where the row is not finite), row 1: 1 if every logit is finite

argmax(logits / T + G) with G = -log(-log U), U uniform per column, is a draw from
softmax(logits / T): the same distribution as the torch path's softmax and exponential
race, without the softmax. The torch path is nine kernels after every step, the softmax
of one 201,088-column row alone ~50 us on an H100 because one block walks the row
(`bench.profile_step --engine`); here the first kernel spreads each row over
V / BLOCK programs (each keeps its best score, its column and whether it saw a
non-finite logit) and the second reduces a row's chunks and writes both rows of `out`,
the layout the engine copies to the host as it is.

U comes from Triton's Philox counter stream keyed by (seed, row * V + column): a fresh
seed per call. Greedy rows take the first maximal column, as torch.argmax does.
"""

from __future__ import annotations

import os

import torch

try:  # optional: importing this module must work where Triton is absent
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only without triton
    triton = tl = None

BLOCK = 4096  # columns per program of the first kernel (fewer for a smaller vocabulary)


def fused_sampling() -> bool:
    """Whether the engine draws with these kernels on a GPU (ROSE_FUSED_SAMPLING=0: the torch ops)."""
    return triton is not None and os.environ.get("ROSE_FUSED_SAMPLING", "1") != "0"


if triton is not None:

    @triton.jit(do_not_specialize=["seed"])  # a fresh seed each call must not compile a variant
    def _chunk_best_kernel(logits_ptr, stride, scale_ptr, noise_ptr, seed, best_ptr, col_ptr, bad_ptr, V, CHUNKS,
                           BLOCK: tl.constexpr):
        row = tl.program_id(0)
        chunk = tl.program_id(1)
        cols = chunk * BLOCK + tl.arange(0, BLOCK)
        inside = cols < V
        x = tl.load(logits_ptr + row.to(tl.int64) * stride + cols, mask=inside, other=0.0)
        finite = (x == x) & (tl.abs(x) < float("inf"))
        u = tl.rand(seed, row.to(tl.int64) * V + cols)  # [0, 1): u = 0 gives -inf, never chosen
        gumbel = -tl.log(-tl.log(u))
        score = x * tl.load(scale_ptr + row) + tl.load(noise_ptr + row) * gumbel
        score = tl.where(inside & finite, score, float("-inf"))
        best, col = tl.max(score, axis=0, return_indices=True, return_indices_tie_break_left=True)
        at = row * CHUNKS + chunk
        tl.store(best_ptr + at, best)
        tl.store(col_ptr + at, chunk * BLOCK + col)
        tl.store(bad_ptr + at, tl.max((inside & ~finite).to(tl.int32), axis=0))

    @triton.jit(do_not_specialize=["rows"])
    def _row_best_kernel(best_ptr, col_ptr, bad_ptr, out_ptr, rows, CHUNKS, CHUNKS_P2: tl.constexpr):
        row = tl.program_id(0)
        chunks = tl.arange(0, CHUNKS_P2)
        inside = chunks < CHUNKS
        best = tl.load(best_ptr + row * CHUNKS + chunks, mask=inside, other=float("-inf"))
        _, chunk = tl.max(best, axis=0, return_indices=True, return_indices_tie_break_left=True)
        col = tl.load(col_ptr + row * CHUNKS + chunk)
        finite = tl.max(tl.load(bad_ptr + row * CHUNKS + chunks, mask=inside, other=0), axis=0) == 0
        tl.store(out_ptr + row, tl.where(finite, col, 0).to(tl.int64))
        tl.store(out_ptr + rows + row, finite.to(tl.int64))


def gumbel_sample(logits: torch.Tensor, scale: torch.Tensor, noise: torch.Tensor, seed: int) -> torch.Tensor:
    """[2, rows] int64: each row's draw (0 where not finite) and its finite flag; see the module doc."""
    rows, vocab = logits.shape
    if logits.dtype != torch.float32 or logits.stride(1) != 1:
        raise ValueError(f"logits must be float32 with contiguous rows, got {logits.dtype} strides {logits.stride()}")
    block = min(BLOCK, triton.next_power_of_2(vocab))
    chunks = triton.cdiv(vocab, block)
    best = torch.empty(rows, chunks, dtype=torch.float32, device=logits.device)
    col = torch.empty(rows, chunks, dtype=torch.int32, device=logits.device)
    bad = torch.empty(rows, chunks, dtype=torch.int32, device=logits.device)
    out = torch.empty(2, rows, dtype=torch.int64, device=logits.device)
    _chunk_best_kernel[(rows, chunks)](logits, logits.stride(0), scale, noise, seed, best, col, bad, vocab, chunks,
                                       BLOCK=block, num_warps=8 if block == BLOCK else 4)
    _row_best_kernel[(rows,)](best, col, bad, out, rows, chunks, CHUNKS_P2=triton.next_power_of_2(chunks), num_warps=1)
    return out


def gumbel_sample_reference(logits: torch.Tensor, scale: torch.Tensor, noise: torch.Tensor,
                            generator: torch.Generator | None = None) -> torch.Tensor:
    """The same in torch with torch's own uniforms (so the same distribution, not the same draws)."""
    x = logits.double()
    finite = torch.isfinite(x).all(dim=-1)
    uniform = torch.rand(x.shape, dtype=torch.float64, device=x.device, generator=generator)
    score = x * scale.double()[:, None] + noise.double()[:, None] * -torch.log(-torch.log(uniform))
    score = torch.where(torch.isfinite(x), score, float("-inf"))
    tokens = torch.where(finite, score.argmax(dim=-1), 0)
    return torch.stack([tokens, finite.long()])

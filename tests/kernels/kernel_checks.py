"""Helpers shared by the kernel tests: relative error and NaN-poisoned outputs.

tests/kernels has no __init__.py on purpose: as a package it would be imported as
`kernels` and shadow the top-level `kernels` package under pytest's prepend import mode.
"""

import torch


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; inf when out holds a NaN (an unwritten poisoned element)."""
    out, ref = out.double(), ref.double()
    if torch.isnan(out).any():
        return float("inf")
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def poisoned(*shape, dtype=torch.bfloat16, device="cuda") -> torch.Tensor:
    """An output buffer full of NaN (or -1 for integers), so an unwritten element shows."""
    if dtype.is_floating_point:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.full(shape, -1, dtype=dtype, device=device)


def run_in_triton_interpreter(source: str, timeout: int) -> None:
    """Run `source` in a child Python under TRITON_INTERPRET=1 (chosen when Triton is imported, and
    this process may hold a compiled-mode Triton) with a fresh SEED; it must print "ok" last."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    seed = int.from_bytes(os.urandom(4), "little")
    env = dict(os.environ, TRITON_INTERPRET="1", SEED=str(seed), PYTHONPATH=root)
    done = subprocess.run([sys.executable, "-c", source], env=env, cwd=root, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), f"seed {seed}\n{done.stdout}\n{done.stderr}"


def graphs_against_eager(model, steps, kv_graph, kv_eager) -> float:
    """Each step through the cuda backend with cuda_graphs on (into kv_graph), then off (into kv_eager);
    asserts every step's logits agree within 1e-2 and returns the worst rel_err. Leaves cuda_graphs on."""
    worst = 0.0
    for i, batch in enumerate(steps):
        model.cuda_graphs = True
        got = model(batch, kv_graph).clone()
        model.cuda_graphs = False
        want = model(batch, kv_eager)
        err = rel_err(got, want)
        worst = max(worst, err)
        assert err <= 1e-2, f"step {i} (query lens {batch.query_lens}): graphs vs eager {err:.2e}"
    model.cuda_graphs = True
    return worst


def assert_rows_close(got: torch.Tensor, want: torch.Tensor, what: str, tol: float = 1e-2) -> None:
    """Each row (one sequence's logits) within tol of its reference, but at most one row of three or more.

    Two runs that round differently (a graph padded to its bucket against eager on the real rows picks
    other GEMM tiles) can, on random weights, send one token to another expert at a router near-tie, which
    moves that row by ~1e-1 (6.7e-2 seen); a stale plan, slot or page list moves every row."""
    errs = [rel_err(g, w) for g, w in zip(got, want)]
    off = [i for i, e in enumerate(errs) if e > tol]
    assert len(off) <= (1 if len(errs) >= 3 else 0), f"{what}: rows {off} off by {[f'{errs[i]:.2e}' for i in off]}"


def assert_same_real_blocks(kv_graph, kv_eager) -> None:
    """Every layer's k and v agree (rel_err <= 1e-2) outside the scratch blocks, which graph padding rows write."""
    groups = kv_graph.layer_groups
    for name, ours, theirs in (("k", kv_graph.k, kv_eager.k), ("v", kv_graph.v, kv_eager.v)):
        for layer, (a, b) in enumerate(zip(ours, theirs)):
            real = kv_graph.scratch_blocks[groups[layer]]
            assert rel_err(a[:real], b[:real]) <= 1e-2, f"layer {layer} {name} cache differs"


def step_batch(seq_ids, contexts, new_tokens, vocab: int, pages: int, block: int = 16, window: int = 128):
    """A step in which each listed sequence brings new_tokens tokens (one count for all, or one each) after its
    context, random ids. Sequence s owns blocks s*pages .. (s+1)*pages - 1 of each pool; its sliding table
    starts with a NO_BLOCK for every block wholly before its first new token's window, as the engine's do."""
    from services.worker.model import ForwardBatch
    from services.worker.model.batch import NO_BLOCK

    q = [new_tokens] * len(seq_ids) if isinstance(new_tokens, int) else list(new_tokens)
    positions = torch.cat([torch.arange(c, c + n) for c, n in zip(contexts, q)])
    full = [list(range(s * pages, (s + 1) * pages)) for s in seq_ids]
    sliding = []
    for s, c in zip(seq_ids, contexts):
        gone = max(0, (c - window + 1) // block)
        sliding.append([NO_BLOCK] * gone + list(range(s * pages + gone, (s + 1) * pages)))
    return ForwardBatch(token_ids=torch.randint(0, vocab, (len(positions),)), positions=positions, query_lens=q,
                        context_lens=[c + n for c, n in zip(contexts, q)],
                        block_tables={"full": full, "sliding": sliding})

"""Decode steps replayed from CUDA graphs against the same steps run eagerly (GPU only).

One model, two KV caches fed the same steps: cuda_graphs on for one, off for the other.
The steps change batch size within and across buckets (padding rows), grow contexts
past the 128-token window (sliding tables start with NO_BLOCK) and interleave a prefill,
so a graph that kept a stale plan, slot or page list would read or write wrong keys.
Steps that mix decode rows with short prompt chunks replay a graph one row a new token
(cuda_graphs.as_decode_rows): their logits and the keys they write against eager.
"""

import pytest
import torch

from kernel_checks import assert_rows_close, assert_same_real_blocks, graphs_against_eager, step_batch
from services.worker.model import load_model, make_checkpoint

pytestmark = pytest.mark.gpu

BLOCK = 16
WINDOW = 128
PAGES = 24  # per sequence: room for 384 tokens


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(str(tmp_path_factory.mktemp("ckpt") / "20b-2layer"), seed=3, preset="20b",
                           num_hidden_layers=2, device="cuda")


@pytest.fixture(scope="module", params=["mxfp4", "bf16", "mxfp4-flashinfer", "mxfp4-xqa", "mxfp4-unfused"])
def model(request, checkpoint):
    """The model of `loaded_model`, its eager steps taking triton-kernels' experts (where it imports) as the
    prefill graphs do (cuda_prefill_graphs.py): graph and eager prefills run the same kernels."""
    loaded = loaded_model(request, checkpoint)
    for layer in loaded.layers:
        layer["moe"].tk_eager_rows = 1
    return loaded


def loaded_model(request, checkpoint):
    """The cuda backend as loaded (MXFP4 experts, the split decode attention), over bf16 experts (the
    torch._grouped_mm path), and with decode attention through FlashInfer's sink wrapper
    (ROSE_DECODE_ATTENTION=flashinfer: graph and eager decode steps both) or XQA, and with the QKV GEMV
    and the rotary + cache write apart and down's weight copies waiting for gate_up (ROSE_FUSED_QKV_ROPE=0,
    ROSE_EARLY_DOWN=0)."""
    if request.param == "mxfp4":
        loaded = load_model(checkpoint, backend="cuda")
        assert loaded.decode_attention is not None and loaded.decode_attention.split
        assert loaded.fused_qkv_rope and loaded.layers[0]["moe"].early_down
        return loaded
    if request.param == "mxfp4-xqa":  # decode attention through FlashInfer's XQA (graphs too: the choice is
        # read once, at load)
        with pytest.MonkeyPatch.context() as env:
            env.setenv("ROSE_DECODE_ATTENTION", "xqa")
            xqa = load_model(checkpoint, backend="cuda")
        assert xqa.decode_attention is not None and not xqa.decode_attention.split
        return xqa
    if request.param == "mxfp4-unfused":
        with pytest.MonkeyPatch.context() as env:
            env.setenv("ROSE_FUSED_QKV_ROPE", "0")
            env.setenv("ROSE_EARLY_DOWN", "0")
            apart = load_model(checkpoint, backend="cuda")
        assert not apart.fused_qkv_rope and not apart.layers[0]["moe"].early_down
        return apart
    if request.param == "mxfp4-flashinfer":
        with pytest.MonkeyPatch.context() as env:
            env.setenv("ROSE_DECODE_ATTENTION", "flashinfer")
            wrapper = load_model(checkpoint, backend="cuda")
        assert wrapper.decode_attention is None
        return wrapper
    from services.worker.model.cuda_backend import CudaGptOss

    return CudaGptOss(load_model(checkpoint, device="cuda", dtype=torch.bfloat16, keep_mxfp4=False))


def _step(seq_ids, contexts, new_tokens, vocab):
    return step_batch(seq_ids, contexts, new_tokens, vocab, PAGES, BLOCK, WINDOW)


def test_graph_decode_matches_eager(model):
    vocab = model.config.vocab_size
    blocks = {"full": 8 * PAGES, "sliding": 8 * PAGES}
    kv_graph, kv_eager = model.make_kv_cache(blocks, BLOCK), model.make_kv_cache(blocks, BLOCK)
    contexts = {s: 0 for s in range(8)}
    steps = []
    prompt = _step(list(range(8)), [0] * 8, 120, vocab)
    steps.append(prompt)
    for s in contexts:
        contexts[s] = 120
    # decode rounds: 3 of 8 sequences (bucket 4, one padding row), then 5 (bucket 8), then 1, then 8,
    # 20 rounds in all so contexts cross the window
    pattern = [[0, 1, 2], [3, 4, 5, 6, 7], [2], list(range(8))]
    for round_ in range(20):
        ids = pattern[round_ % len(pattern)]
        steps.append(_step(ids, [contexts[s] for s in ids], 1, vocab))
        for s in ids:
            contexts[s] += 1
    worst = graphs_against_eager(model, steps, kv_graph, kv_eager)
    print(f"worst graph vs eager logits over {len(steps)} steps: {worst:.2e}; buckets captured "
          f"{sorted(model.graphs.captured)}")
    assert sorted(model.graphs.captured) == [1, 4, 8]
    # padding rows wrote only the scratch blocks: every real block holds the same keys and values
    assert_same_real_blocks(kv_graph, kv_eager)


def test_graph_path_is_used_for_decode(model):
    """A decode step through graphs does not run the eager attention plan (it would replan the eager wrappers)."""
    blocks = {"full": 2 * PAGES, "sliding": 2 * PAGES}
    kv = model.make_kv_cache(blocks, BLOCK)
    model.cuda_graphs = True
    model(_step([0, 1], [0, 0], 10, model.config.vocab_size), kv)
    model.graphs = None
    logits = model(_step([0, 1], [10, 10], 1, model.config.vocab_size), kv)
    assert model.graphs is not None and list(model.graphs.captured) == [2]
    assert logits.shape == (2, model.config.vocab_size) and torch.isfinite(logits).all()


def test_short_prompt_chunks_replay_as_decode_rows(model):
    """Decode rows next to short prompt chunks (a cached prefix's tail, a new short prompt, a chunk
    crossing the window) replay one graph, each chunk token a row: the chunks' last-token logits, the
    keys they write and the decode steps after them match eager; a long chunk takes no decode graph (it
    replays the prefill graphs, tests/kernels/test_kernels_cuda_prefill_graphs_gpu.py)."""
    from services.worker.model.cuda_graphs import BUCKETS, EXTEND_TOKENS, as_decode_rows

    vocab = model.config.vocab_size
    blocks = {"full": 8 * PAGES, "sliding": 8 * PAGES}
    kv_graph, kv_eager = model.make_kv_cache(blocks, BLOCK), model.make_kv_cache(blocks, BLOCK)
    contexts = [150, 40, 200, 0, 0]
    steps = [_step([0, 1, 2], [0, 0, 0], [150, 40, 200], vocab),  # the contexts: prefill graphs against eager
             # seq 0 decodes; 1 extends 16 tokens across a block; 2 extends 5 past the window; 3 is a
             # 12-token prompt; 4 a 3-token one: 1 + 16 + 5 + 12 + 3 = 37 rows, bucket 64
             _step([0, 1, 2, 3, 4], contexts, [1, 16, 5, 12, 3], vocab)]
    contexts = [151, 56, 205, 12, 3]
    steps.append(_step([0, 1, 2, 3, 4], contexts, 1, vocab))
    steps.append(_step([4, 0], [4, 152], [EXTEND_TOKENS + 1, 1], vocab))  # too long for decode rows
    model.graphs = None
    used = []
    for i, batch in enumerate(steps):
        # each step from the same cache: the first step's prefill (the prefill graphs against eager, whose expert
        # GEMMs pick tiles by rows, padded or not) may round a key differently, and on random weights a router
        # near-tie then moves a later row by 1e-1
        for eager, graph in zip(kv_eager.k + kv_eager.v, kv_graph.k + kv_graph.v):
            eager.copy_(graph)
        model.cuda_graphs = True
        got = model(batch, kv_graph).clone()
        used.append(sorted(model.graphs.captured) if model.graphs else [])
        model.cuda_graphs = False
        # eager, the same rows (the same attention kernel): a prefill's kernels round otherwise, and on random
        # weights a router near-tie then moves a whole row (test_kernels_cuda_backend_gpu checks the math)
        rows = as_decode_rows(batch, BUCKETS[-1]) if model.graphs.prompt_rows else None
        if rows is None or rows is batch:
            want = model(batch, kv_eager)
        else:
            want = model(rows, kv_eager)[torch.cumsum(torch.tensor(batch.query_lens), 0) - 1]
        assert got.shape == (batch.num_seqs, vocab)
        assert_rows_close(got, want, f"step {i} (query lens {batch.query_lens}): graph vs eager")
        assert_same_real_blocks(kv_graph, kv_eager)
    model.cuda_graphs = True
    if model.graphs.prompt_rows:  # the split decode attention
        assert used[0] == [] and used[1] == [64], used  # the first step too long for rows, the mixed one replayed
        assert used[3] == [8, 64], used  # the decode step replayed bucket 8; the long chunk no decode bucket
    else:  # XQA or FlashInfer's wrapper: steps with prompt chunks take no decode graph
        assert used[1] == [] and used[3] == [8], used

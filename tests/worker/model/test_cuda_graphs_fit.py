"""Which steps the cuda backend's decode graphs take (CPU: the choice only; the graphs run in tests/kernels)."""

import torch

from services.worker.model.batch import ForwardBatch, PagedKVCache
from services.worker.model.cuda_graphs import BUCKETS, DecodeGraphs, step_pages

BS = 16


def _decode(context_lens, shared_prefix_blocks=0):
    """One new token per sequence; the first blocks of every table are the same (a shared prefix)."""
    tables = []
    next_block = shared_prefix_blocks
    for ctx in context_lens:
        own = (ctx + BS - 1) // BS - shared_prefix_blocks
        tables.append(list(range(shared_prefix_blocks)) + list(range(next_block, next_block + own)))
        next_block += own
    n = len(context_lens)
    return ForwardBatch(token_ids=torch.zeros(n, dtype=torch.long), positions=torch.tensor(context_lens) - 1,
                        query_lens=[1] * n, context_lens=list(context_lens),
                        block_tables={"full": tables, "sliding": tables})


def _graphs(pool_blocks):
    """The routing state of DecodeGraphs over a cache of pool_blocks blocks (no CUDA needed to decide)."""
    kv = PagedKVCache.allocate(["full", "sliding"], {"full": 1, "sliding": 1}, BS, 1, 8, torch.float32, "cpu")
    kv.scratch_blocks = {"full": pool_blocks - 1, "sliding": pool_blocks - 1}
    graphs = DecodeGraphs.__new__(DecodeGraphs)
    graphs.kv, graphs.buckets, graphs.max_pages = kv, BUCKETS, {"full": pool_blocks, "sliding": pool_blocks}
    return graphs


def test_decode_steps_within_the_pool_take_a_graph():
    graphs = _graphs(pool_blocks=200)
    batch = _decode([100, 300, 17])
    assert step_pages(batch, BS) == 7 + 19 + 2
    assert graphs.fits(batch)
    assert graphs.bucket(3) == 4 and graphs.bucket(1) == 1 and graphs.bucket(256) == 256


def test_a_shared_prefix_listed_past_the_pool_runs_eagerly():
    # 8 sequences share 40 blocks: 8 x 41 = 328 pages listed, from only 48 distinct blocks
    graphs = _graphs(pool_blocks=200)
    batch = _decode([41 * BS] * 8, shared_prefix_blocks=40)
    assert step_pages(batch, BS) == 328 > 200
    assert not graphs.fits(batch)


def test_prefill_and_oversized_steps_run_eagerly():
    graphs = _graphs(pool_blocks=10_000)
    prefill = _decode([5, 6])
    prefill.query_lens = [5, 1]
    assert not graphs.fits(prefill)
    assert not graphs.fits(_decode([3] * (BUCKETS[-1] + 1)))

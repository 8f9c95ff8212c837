"""Which steps the cuda backend's decode graphs take (CPU: the choice only; the graphs run in tests/kernels)."""

import torch

from services.worker.model.batch import NO_BLOCK, ForwardBatch, PagedKVCache
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


def _graphs(pool_blocks, sliding_blocks=None):
    """The routing state of DecodeGraphs over pools of these sizes (no CUDA needed to decide)."""
    sliding_blocks = sliding_blocks or pool_blocks
    kv = PagedKVCache.allocate(["full", "sliding"], {"full": 1, "sliding": 1}, BS, 1, 8, torch.float32, "cpu")
    kv.scratch_blocks = {"full": pool_blocks - 1, "sliding": sliding_blocks - 1}
    graphs = DecodeGraphs.__new__(DecodeGraphs)
    graphs.kv, graphs.buckets, graphs.max_pages = kv, BUCKETS, {"full": pool_blocks, "sliding": sliding_blocks}
    graphs.xqa_width = None  # FlashInfer's wrapper for decode attention (ROSE_DECODE_ATTENTION=flashinfer)
    return graphs


def test_with_xqa_a_step_fits_when_each_sequence_fits_a_row():
    # XQA rows list a sequence's pages from position 0 in every group, so a small sliding pool does not
    # bound them and a shared prefix listed by many sequences costs nothing extra
    graphs = _graphs(pool_blocks=200, sliding_blocks=8)
    graphs.xqa_width = 200
    assert graphs.fits(_decode([41 * BS] * 8, shared_prefix_blocks=40))
    assert graphs.fits(_decode([200 * BS]))
    assert not graphs.fits(_decode([200 * BS + 1]))


def test_decode_steps_within_the_pool_take_a_graph():
    graphs = _graphs(pool_blocks=200)
    batch = _decode([100, 300, 17])
    assert step_pages(batch, "full", BS) == 7 + 19 + 2
    assert graphs.fits(batch)
    assert graphs.bucket(3) == 4 and graphs.bucket(1) == 1 and graphs.bucket(256) == 256


def test_a_shared_prefix_listed_past_the_pool_runs_eagerly():
    # 8 sequences share 40 blocks: 8 x 41 = 328 pages listed, from only 48 distinct blocks
    graphs = _graphs(pool_blocks=200)
    batch = _decode([41 * BS] * 8, shared_prefix_blocks=40)
    assert step_pages(batch, "full", BS) == 328 > 200
    assert not graphs.fits(batch)


def test_prefill_and_oversized_steps_run_eagerly():
    graphs = _graphs(pool_blocks=10_000)
    prefill = _decode([5, 6])
    prefill.query_lens = [5, 1]
    assert not graphs.fits(prefill)
    assert not graphs.fits(_decode([3] * (BUCKETS[-1] + 1)))


def test_a_small_sliding_pool_bounds_only_the_sliding_page_lists():
    # the engine sizes the sliding pool for windows (8 blocks here) and the full pool for contexts:
    # 64 sequences of 69 pages list 4416 full pages but, past the window, 2 sliding pages each
    graphs = _graphs(pool_blocks=65_536, sliding_blocks=200)
    batch = _decode([1100] * 64)
    pages = (1100 + BS - 1) // BS
    batch.block_tables["sliding"] = [[NO_BLOCK] * (pages - 2) + t[-2:] for t in batch.block_tables["full"]]
    assert step_pages(batch, "full", BS) == 64 * pages > 200
    assert step_pages(batch, "sliding", BS) == 64 * 2
    assert graphs.fits(batch)
    batch.block_tables["sliding"] = [[NO_BLOCK] * (pages - 4) + t[-4:] for t in batch.block_tables["full"]]
    assert step_pages(batch, "sliding", BS) == 256 > 200
    assert not graphs.fits(batch)

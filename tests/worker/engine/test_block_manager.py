"""Block pools, prefix cache, LRU eviction, window release and KV events (no model needed)."""

from __future__ import annotations

import pytest

from services.worker.engine.block_manager import BlockManager, BlockPool, BlockTables
from services.worker.model.batch import NO_BLOCK
from shared.block_hash import prefix_hashes

BS = 4


def all_free(bm: BlockManager) -> bool:
    return all(p.num_free == p.num_total and all(b.ref_count == 0 for b in p.blocks) for p in bm.pools.values())


def computed_seq(bm: BlockManager, tokens: list[int]) -> BlockTables:
    """A sequence whose tokens were all computed in one step from an empty cache."""
    seq = BlockTables(hashes=prefix_hashes(tokens, BS))
    bm.grow(seq, 0, len(tokens))
    bm.register_full_blocks(seq, tokens, len(tokens))
    return seq


def test_pool_allocates_uncached_blocks_before_evicting_cached_ones():
    pool = BlockPool(3, record_events=True)
    a, b = pool.allocate(), pool.allocate()
    pool.register(a, 111)
    pool.release(a)  # cached, evictable
    pool.release(b)  # plain: handed out first
    assert pool.num_free == 3
    assert pool.allocate() == b
    c = pool.allocate()
    assert c not in (a, b)
    assert pool.lookup(111) == a
    assert pool.allocate() == a  # only now is the cached block evicted
    assert pool.lookup(111) is None
    assert pool.drain_events() == ([], [111])  # net: stored then evicted
    assert pool.drain_events() == ([], [])
    pool.register(a, 111)
    pool.register(b, 222)
    assert pool.drain_events() == ([111, 222], [])


def test_pool_evicts_least_recently_freed_first():
    pool = BlockPool(3)
    ids = [pool.allocate() for _ in range(3)]
    for h, block in zip((1, 2, 3), ids):
        pool.register(block, h)
    for block in (ids[1], ids[0], ids[2]):
        pool.release(block)
    assert pool.allocate() == ids[1]
    assert pool.lookup(2) is None and pool.lookup(1) == ids[0]


def test_pool_refuses_double_release_and_duplicate_hash():
    pool = BlockPool(2)
    a, b = pool.allocate(), pool.allocate()
    pool.register(a, 5)
    pool.register(b, 5)  # same prefix computed twice: only the first is cached
    assert pool.lookup(5) == a and pool.blocks[b].hash is None
    pool.release(a)
    with pytest.raises(RuntimeError):
        pool.release(a)


def test_shared_prefix_blocks_are_reference_counted():
    bm = BlockManager(["full"], {"full": 8}, BS)
    tokens = list(range(10))  # 2 full blocks + 2 tokens
    first = computed_seq(bm, tokens)
    assert bm.num_free("full") == 5
    second = BlockTables(hashes=prefix_hashes(tokens + [99], BS))
    hit = bm.find_cached_prefix(second.hashes, len(tokens))
    assert hit == 2
    bm.adopt_prefix(second, hit)
    assert second.tables["full"] == first.tables["full"][:2]
    assert [bm.pools["full"].blocks[b].ref_count for b in second.tables["full"]] == [2, 2]
    bm.free(first)
    assert bm.num_free("full") == 6  # the unshared partial block came back
    bm.free(second)
    assert all_free(bm)
    # Freed but cached: a third request still hits both blocks.
    assert bm.find_cached_prefix(prefix_hashes(tokens, BS), 9) == 2


def test_hit_never_covers_the_last_token():
    bm = BlockManager(["full"], {"full": 8}, BS)
    tokens = list(range(8))
    bm.free(computed_seq(bm, tokens))
    hashes = prefix_hashes(tokens, BS)
    assert bm.find_cached_prefix(hashes, len(tokens) - 1) == 1
    assert bm.find_cached_prefix(hashes, len(tokens)) == 2


def test_sliding_blocks_out_of_window_are_released():
    window = 6
    bm = BlockManager(["sliding", "full"], {"sliding": 6, "full": 12}, BS, window=window)
    seq = BlockTables()
    tokens = list(range(20))
    bm.grow(seq, 0, 8)
    bm.register_full_blocks(seq, tokens, 8)
    assert len(seq.tables["sliding"]) == 2 and NO_BLOCK not in seq.tables["sliding"]
    for pos in range(8, 20):  # decode one token at a time
        assert bm.reachable_tokens(seq, pos) > pos
        bm.grow(seq, pos, pos + 1)
        bm.register_full_blocks(seq, tokens, pos + 1)
        first = bm.first_needed_block("sliding", pos)
        sliding = seq.tables["sliding"]
        assert all(b == NO_BLOCK for b in sliding[:first])
        assert all(b != NO_BLOCK for b in sliding[first:])
        # the query at pos reads positions > pos - window: all still held
        assert (pos - window + 1) // BS >= first
    assert len(seq.tables["full"]) == 5 and NO_BLOCK not in seq.tables["full"]
    assert bm.num_free("sliding") == 6 - 2  # only the window's blocks are held
    bm.free(seq)
    assert all_free(bm)


def test_holds_exactly_when_grow_would_change_nothing():
    """The scheduler's decode fast path: holds() is True only where grow() would neither take a block nor
    release one, checked step by step as a sequence decodes past block bounds and its window."""
    bm = BlockManager(["sliding", "full"], {"sliding": 8, "full": 12}, BS, window=6)
    seq = BlockTables()
    assert not bm.holds(seq, 0, 5)  # no tables yet
    bm.grow(seq, 0, 5)
    seen = set()
    for pos in range(5, 30):
        before = {g: list(t) for g, t in seq.tables.items()}
        held = bm.holds(seq, pos, pos + 1)
        bm.grow(seq, pos, pos + 1)
        assert held == (seq.tables == before), pos
        seen.add(held)
    assert seen == {True, False}
    bm.free(seq)
    assert all_free(bm) and seq.released == {} and seq.registered == 0


def test_prefix_hit_needs_the_sliding_window_blocks():
    window = 6
    bm = BlockManager(["sliding", "full"], {"sliding": 4, "full": 12}, BS, window=window)
    tokens = list(range(24))
    seq = BlockTables(hashes=prefix_hashes(tokens, BS))
    for pos in range(0, 24, 4):  # prefill in chunks of one block, releasing old sliding blocks
        bm.grow(seq, pos, pos + 4)
        bm.register_full_blocks(seq, tokens, pos + 4)
    bm.free(seq)
    hashes = prefix_hashes(tokens + [7], BS)
    # The full group holds all 6 blocks; the sliding pool (4 blocks) still holds the
    # window of a query starting at 24 (blocks 4 and 5), so the hit is whole.
    assert bm.find_cached_prefix(hashes, 24) == 6
    # Evict the sliding blocks the window of position 24 needs: the hit must shrink
    # to a prefix whose window blocks are still cached, or to nothing.
    sliding = bm.pools["sliding"]
    for h in hashes[4:6]:
        block = sliding.lookup(h)
        sliding._free.move_to_end(block, last=False)
    taken = [sliding.allocate(), sliding.allocate()]
    hit = bm.find_cached_prefix(hashes, 24)
    assert hit < 6
    first = bm.first_needed_block("sliding", hit * BS)
    assert all(sliding.lookup(hashes[i]) is not None for i in range(first, hit))
    for block in taken:
        sliding.release(block)


def test_adopted_prefix_holds_only_window_blocks_in_sliding_group():
    window = 6
    bm = BlockManager(["sliding", "full"], {"sliding": 8, "full": 8}, BS, window=window)
    tokens = list(range(16))
    bm.free(computed_seq(bm, tokens))
    seq = BlockTables(hashes=prefix_hashes(tokens + [1, 2], BS))
    hit = bm.find_cached_prefix(seq.hashes, 17)
    assert hit == 4
    assert bm.reachable_after_hit(seq.hashes, hit) == (4 + 8 - 4) * BS
    bm.adopt_prefix(seq, hit)
    first = bm.first_needed_block("sliding", 16)
    assert first == 2
    assert seq.tables["sliding"][:first] == [NO_BLOCK] * first
    assert NO_BLOCK not in seq.tables["full"]
    bm.free(seq)
    assert all_free(bm)


def test_kv_events_report_the_full_group_hashes():
    bm = BlockManager(["sliding", "full"], {"sliding": 3, "full": 3}, BS, window=4)
    tokens = list(range(12))
    seq = computed_seq(bm, tokens)
    stored, removed = bm.drain_kv_events()
    assert stored == prefix_hashes(tokens, BS) and removed == []
    bm.free(seq)
    other = BlockTables()
    bm.grow(other, 0, 12)  # needs all 3 full blocks: every cached one is evicted
    stored, removed = bm.drain_kv_events()
    assert stored == [] and sorted(removed) == sorted(prefix_hashes(tokens, BS))
    bm.free(other)


def test_reachable_tokens_counts_free_blocks():
    bm = BlockManager(["full"], {"full": 3}, BS)
    seq = BlockTables()
    assert bm.reachable_tokens(seq, 0) == 12
    bm.grow(seq, 0, 5)
    assert bm.reachable_tokens(seq, 5) == 12
    hog = BlockTables()
    bm.grow(hog, 0, 4)
    assert bm.reachable_tokens(seq, 5) == 8  # the last block is partly filled: 3 more tokens fit
    bm.free(hog)
    bm.free(seq)
    assert all_free(bm)

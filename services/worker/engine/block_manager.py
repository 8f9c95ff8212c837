"""Paged KV blocks: one pool per attention group, with a prefix cache and window release.

A pool hands out fixed-size block ids. Blocks are reference counted so requests that
share a prompt prefix share its blocks. A full block that was computed is registered
under its chained hash (shared/block_hash.py); when its last user lets go it stays
in the pool as *evictable*: it still holds valid KV and can be reused by a later
request with the same prefix, until a fresh allocation evicts it (least recently
freed first). Blocks that hold no reusable KV are handed out before evictable ones.

The "sliding" group serves the sliding-window layers: a block wholly older than the
window of every query still to come is released early (its table entry becomes
NO_BLOCK) so long contexts cost window-sized memory in that group.

Stored/removed hashes of the "full" group are kept as KV events for the scheduler's
prefix index: the full group is the one that must hold a whole prefix for a hit.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, field

from services.worker.model.batch import NO_BLOCK
from shared.block_hash import block_hash

# The group whose hashes the scheduler indexes (see the module docstring).
INDEXED_GROUP = "full"


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: int | None = None  # set once the block is full and computed


class BlockPool:
    """The blocks of one attention group: free queue, reference counts, hash map.

    `_free` holds every block with ref_count 0 in eviction order: blocks without
    reusable KV at the front, then evictable cached blocks, least recently freed first.
    """

    def __init__(self, num_blocks: int, record_events: bool = False):
        if num_blocks <= 0:
            raise ValueError(f"a block pool needs at least one block, got {num_blocks}")
        self.blocks = [Block(i) for i in range(num_blocks)]
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._by_hash: dict[int, int] = {}
        self._record_events = record_events
        # hash -> True (stored) / False (removed); the last event of a hash wins
        self._events: dict[int, bool] = {}

    @property
    def num_total(self) -> int:
        return len(self.blocks)

    @property
    def num_free(self) -> int:
        """Blocks an allocation can take now (evictable cached blocks included)."""
        return len(self._free)

    @property
    def num_cached(self) -> int:
        return len(self._by_hash)

    def lookup(self, block_hash_: int) -> int | None:
        """The block holding the KV of this chained hash, if the pool still has it."""
        return self._by_hash.get(block_hash_)

    def allocate(self) -> int:
        """A fresh block (ref_count 1), evicting the oldest cached one if needed."""
        if not self._free:
            raise RuntimeError("block pool exhausted; check num_free before allocating")
        block_id, _ = self._free.popitem(last=False)
        block = self.blocks[block_id]
        if block.hash is not None:
            self._forget(block)
        block.ref_count = 1
        return block_id

    def share(self, block_id: int) -> None:
        """One more user of a cached block (taking it out of the free queue if idle)."""
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self._free[block_id]
        block.ref_count += 1

    def release(self, block_id: int) -> None:
        """One user fewer; an unused block goes back to the free queue."""
        block = self.blocks[block_id]
        if block.ref_count <= 0:
            raise RuntimeError(f"block {block_id} released more often than taken")
        block.ref_count -= 1
        if block.ref_count == 0:
            self._free[block_id] = None
            if block.hash is None:
                # Nothing to reuse in it: hand it out before any cached block.
                self._free.move_to_end(block_id, last=False)

    def register(self, block_id: int, block_hash_: int) -> None:
        """Mark a computed full block as the holder of this prefix hash."""
        block = self.blocks[block_id]
        if block.hash is not None or block_hash_ in self._by_hash:
            # Already cached, or another block computed the same prefix first: keep one.
            return
        block.hash = block_hash_
        self._by_hash[block_hash_] = block_id
        self._note(block_hash_, True)

    def drain_events(self) -> tuple[list[int], list[int]]:
        """Net (stored, removed) hashes since the last drain; a hash is in at most one list.

        A hash stored and evicted within one period is reported removed, so a receiver
        applying removals then stores ends with exactly the pool's cached hashes.
        """
        events, self._events = self._events, {}
        return [h for h, kept in events.items() if kept], [h for h, kept in events.items() if not kept]

    def _note(self, block_hash_: int, stored: bool) -> None:
        if self._record_events:
            self._events.pop(block_hash_, None)
            self._events[block_hash_] = stored

    def _forget(self, block: Block) -> None:
        """Drop a block's cache entry (it stays allocated if in use)."""
        del self._by_hash[block.hash]
        self._note(block.hash, False)
        block.hash = None


@dataclass
class BlockTables:
    """One sequence's block ids per group and its chained block hashes."""

    tables: dict[str, list[int]] = field(default_factory=dict)
    hashes: list[int] = field(default_factory=list)  # of the sequence's full blocks, in order
    # Leading entries a step need not look at again, so a step's work on a sequence does not grow
    # with its context (at 8192 tokens a table is 512 blocks, visited three times a step before):
    released: dict[str, int] = field(default_factory=dict)  # per group: leading blocks released (NO_BLOCK)
    registered: int = 0  # leading full blocks already offered to the prefix cache


class BlockManager:
    """KV blocks of every attention group for all sequences of one engine.

    block_size: tokens per block. num_blocks: blocks per group. window: tokens a
    sliding-layer query sees, itself included (0 when there is no sliding group).
    """

    def __init__(self, groups: list[str], num_blocks: dict[str, int], block_size: int, window: int = 0):
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.groups = list(dict.fromkeys(groups))
        self.block_size = block_size
        self.window = window if "sliding" in self.groups else 0
        if "sliding" in self.groups and self.window <= 0:
            raise ValueError("a sliding group needs a positive window")
        # With no full group, the sliding group's hashes are the best index there is.
        indexed = INDEXED_GROUP if INDEXED_GROUP in self.groups else self.groups[0]
        self.pools = {g: BlockPool(num_blocks[g], record_events=(g == indexed)) for g in self.groups}

    # ------------------------------------------------------------------ sizes
    def first_needed_block(self, group: str, query_start: int) -> int:
        """Index of the oldest block a query starting at position query_start still reads.

        Sliding layers read positions > query_start - window; one position more is kept
        so an off-by-one window convention in a backend can never read a freed block.
        """
        if group != "sliding":
            return 0
        return max(0, query_start - self.window) // self.block_size

    def min_blocks(self, group: str, num_tokens: int) -> int:
        """Blocks one sequence needs in this group to reach num_tokens one token per step."""
        total = math.ceil(num_tokens / self.block_size)
        if group != "sliding":
            return total
        # The window (plus the kept extra position) and the new token can straddle blocks.
        return min(total, math.ceil((self.window + 1) / self.block_size) + 1)

    def num_free(self, group: str) -> int:
        return self.pools[group].num_free

    def num_total(self, group: str) -> int:
        return self.pools[group].num_total

    # ------------------------------------------------------------------ prefix cache
    def find_cached_prefix(self, hashes: list[int], max_tokens: int) -> int:
        """How many leading blocks of a sequence can be reused from the cache.

        hashes: chained hashes of the sequence's full blocks. max_tokens: most tokens a
        hit may cover (the engine always recomputes the last prompt token). A prefix of
        m blocks is a hit when the full group holds all m and the sliding group holds
        the blocks the next query (starting at m * block_size) still reads.
        """
        limit = min(len(hashes), max_tokens // self.block_size)
        full = self.pools.get("full")
        m = 0
        if full is not None:
            while m < limit and full.lookup(hashes[m]) is not None:
                m += 1
        else:
            m = limit
        sliding = self.pools.get("sliding")
        while m > 0 and sliding is not None:
            first = self.first_needed_block("sliding", m * self.block_size)
            if all(sliding.lookup(hashes[i]) is not None for i in range(first, m)):
                break
            m -= 1
        return m

    def reachable_after_hit(self, hashes: list[int], num_hit: int) -> int:
        """Most tokens an empty sequence could hold after reusing num_hit cached blocks.

        Idle cached blocks count against the free blocks: sharing them takes them off
        the free queue.
        """
        best = math.inf
        for group, pool in self.pools.items():
            first = self.first_needed_block(group, num_hit * self.block_size)
            idle = sum(1 for i in range(first, num_hit) if pool.blocks[pool.lookup(hashes[i])].ref_count == 0)
            best = min(best, (num_hit + pool.num_free - idle) * self.block_size)
        return int(best)

    def adopt_prefix(self, seq: BlockTables, num_hit: int) -> None:
        """Give an empty sequence the cached blocks of its first num_hit blocks."""
        for group, pool in self.pools.items():
            first = self.first_needed_block(group, num_hit * self.block_size)
            table = seq.tables.setdefault(group, [])
            assert not table, "adopt_prefix on a sequence that already holds blocks"
            seq.released[group] = min(first, num_hit)
            for i in range(num_hit):
                if i < first:
                    table.append(NO_BLOCK)
                else:
                    block_id = pool.lookup(seq.hashes[i])
                    pool.share(block_id)
                    table.append(block_id)
        seq.registered = num_hit  # cached blocks all

    # ------------------------------------------------------------------ growth
    def reachable_tokens(self, seq: BlockTables, query_start: int) -> int:
        """Most tokens seq could hold after a step whose query starts at query_start.

        Counts the free blocks of each group plus the sliding blocks that step would
        release (those only this sequence holds).
        """
        best = math.inf
        for group, pool in self.pools.items():
            table = seq.tables.get(group, [])
            first = self.first_needed_block(group, query_start)
            done = seq.released.get(group, 0)
            releasable = sum(1 for b in table[done:first] if b != NO_BLOCK and pool.blocks[b].ref_count == 1)
            best = min(best, (len(table) + pool.num_free + releasable) * self.block_size)
        return int(best)

    def holds(self, seq: BlockTables, query_start: int, total_tokens: int) -> bool:
        """Whether grow(seq, query_start, total_tokens) would change nothing: every group's table already
        reaches total_tokens and no block leaves the window (a decode step's 15 steps out of 16)."""
        need = -(-total_tokens // self.block_size)
        for group in self.pools:
            table = seq.tables.get(group)
            if table is None or len(table) < need or seq.released.get(group, 0) < self.first_needed_block(
                    group, query_start):
                return False
        return True

    def grow(self, seq: BlockTables, query_start: int, total_tokens: int) -> None:
        """Release out-of-window blocks, then allocate blocks up to total_tokens.

        Callers keep total_tokens within `reachable_tokens(seq, query_start)`.
        """
        for group, pool in self.pools.items():
            table = seq.tables.setdefault(group, [])
            first = self.first_needed_block(group, query_start)
            done = seq.released.get(group, 0)
            for i in range(done, min(first, len(table))):
                if table[i] != NO_BLOCK:
                    pool.release(table[i])
                    table[i] = NO_BLOCK
            seq.released[group] = max(done, min(first, len(table)))
            wanted = math.ceil(total_tokens / self.block_size)
            while len(table) < wanted:
                table.append(pool.allocate())

    def register_full_blocks(self, seq: BlockTables, token_ids: list[int], num_computed: int) -> None:
        """Hash and cache every full block whose KV is now computed.

        token_ids: the sequence's tokens; num_computed: how many have KV in the cache.
        """
        full_blocks = num_computed // self.block_size
        while len(seq.hashes) < full_blocks:
            i = len(seq.hashes)
            parent = seq.hashes[-1] if seq.hashes else 0
            seq.hashes.append(block_hash(token_ids[i * self.block_size : (i + 1) * self.block_size], parent))
        done = seq.registered
        if full_blocks <= done:
            return
        for group, pool in self.pools.items():
            table = seq.tables.get(group, [])
            for i in range(done, min(full_blocks, len(table))):
                if table[i] != NO_BLOCK and pool.blocks[table[i]].hash is None:
                    pool.register(table[i], seq.hashes[i])
        seq.registered = min([full_blocks] + [len(seq.tables.get(g, [])) for g in self.pools])

    def free(self, seq: BlockTables, keep_cached: bool = True) -> None:
        """Release every block of a sequence (finished, aborted, failed or preempted).

        Released back to front so a prefix's tail is evicted before its head, which
        other prompts are likelier to share. keep_cached=False (a failed request)
        also drops the cache entries of blocks no one else holds: their KV is suspect.
        """
        for group, pool in self.pools.items():
            table = seq.tables.get(group, [])
            for block_id in reversed(table):
                if block_id == NO_BLOCK:
                    continue
                block = pool.blocks[block_id]
                if not keep_cached and block.ref_count == 1 and block.hash is not None:
                    pool._forget(block)
                pool.release(block_id)
            table.clear()
        seq.released.clear()
        seq.registered = 0

    # ------------------------------------------------------------------ events
    def drain_kv_events(self) -> tuple[list[int], list[int]]:
        """Net (stored, removed) hashes since the last drain, of the indexed group."""
        stored, removed = [], []
        for pool in self.pools.values():
            s, r = pool.drain_events()
            stored += s
            removed += r
        return stored, removed

"""Which tokens of which sequences one engine step computes.

Iteration-level continuous batching: every step, running sequences that decode get
their one token first, then running sequences part way through a chunked prefill,
then waiting requests are admitted (first come, first served) while the token
budget, max_num_seqs and free KV blocks allow. A prompt longer than the budget is
prefilled in chunks over several steps. When a running sequence finds no free
block, the most recently admitted running sequence is preempted: its blocks are
freed and it goes back to the head of the queue to be recomputed later (its prompt
blocks usually come back from the prefix cache).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from services.worker.engine.block_manager import BlockManager
from services.worker.engine.sequence import Sequence, Status
from shared.block_hash import prefix_hashes


@dataclass
class Chunk:
    """Positions [start, end) of seq computed this step."""

    seq: Sequence
    start: int
    end: int

    @property
    def prompt_tokens(self) -> int:
        """How many of the chunk's positions are prompt (the rest are generated tokens)."""
        return max(0, min(self.end, self.seq.num_prompt_tokens) - self.start)

    @property
    def completes(self) -> bool:
        """True when this chunk reaches the sequence's last token, so a token is sampled."""
        return self.end == self.seq.num_tokens


class Scheduler:
    def __init__(self, blocks: BlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.blocks = blocks
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # oldest admitted first
        self.num_preemptions = 0
        self.cached_prompt_tokens = 0  # prompt tokens reused at first admissions
        self.unschedulable: list[Sequence] = []  # could never fit: the engine fails them

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def remove(self, seq: Sequence, keep_cached: bool = True) -> None:
        """Take a sequence out of the queues and free its blocks."""
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
        elif seq.status is Status.WAITING and seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free(seq.blocks, keep_cached)
        seq.status = Status.FINISHED

    def schedule(self) -> list[Chunk]:
        """Plan one step and take the blocks it needs."""
        budget = self.max_num_batched_tokens
        preemptions = self.num_preemptions
        chunks: list[Chunk] = []
        scheduled: set[int] = set()
        decoding = [s for s in self.running if s.num_uncomputed == 1]
        prefilling = [s for s in self.running if s.num_uncomputed > 1]
        for seq in decoding + prefilling:
            if budget == 0:
                break
            if seq.status is not Status.RUNNING:  # preempted earlier in this loop
                continue
            chunk = self._grow_running(seq, budget, scheduled)
            if chunk is not None:
                chunks.append(chunk)
                scheduled.add(id(seq))
                budget -= chunk.end - chunk.start
        # After a preemption the blocks are short: admitting now would only thrash.
        while (self.waiting and budget > 0 and len(self.running) < self.max_num_seqs
               and self.num_preemptions == preemptions):
            chunk = self._admit(self.waiting[0], budget)
            if chunk is None:
                break
            chunks.append(chunk)
            budget -= chunk.end - chunk.start
        return chunks

    def _grow_running(self, seq: Sequence, budget: int, scheduled: set[int]) -> Chunk | None:
        """Blocks for seq's next chunk, preempting later sequences while none are free."""
        start = seq.num_computed
        end = min(seq.num_tokens, start + budget)
        if self.blocks.holds(seq.blocks, start, end):  # nothing to take or release
            return Chunk(seq, start, end)
        while True:
            reach = self.blocks.reachable_tokens(seq.blocks, start)
            if reach > start:
                end = min(seq.num_tokens, start + budget, reach)
                self.blocks.grow(seq.blocks, start, end)
                return Chunk(seq, start, end)
            victims = [s for s in self.running if s is not seq and id(s) not in scheduled]
            self._preempt(victims[-1] if victims else seq)
            if not victims:
                return None

    def _admit(self, seq: Sequence, budget: int) -> Chunk | None:
        """Move the head of the queue to running with its cached prefix and first chunk."""
        bm = self.blocks
        if len(seq.blocks.hashes) < seq.num_tokens // bm.block_size:
            seq.blocks.hashes = prefix_hashes(seq.token_ids, bm.block_size)
        # The last token is always computed: its logits give the next token.
        num_hit = bm.find_cached_prefix(seq.blocks.hashes, seq.num_tokens - 1)
        start = num_hit * bm.block_size
        reach = bm.reachable_after_hit(seq.blocks.hashes, num_hit)
        if reach <= start:
            if not self.running:
                # Every block is free or evictable and it still does not fit.
                self.waiting.popleft()
                self.unschedulable.append(seq)
            return None
        bm.adopt_prefix(seq.blocks, num_hit)
        end = min(seq.num_tokens, start + budget, reach)
        bm.grow(seq.blocks, start, end)
        self.waiting.popleft()
        seq.num_computed = start
        if not seq.admitted:
            seq.admitted = True
            seq.cached_tokens = min(start, seq.num_prompt_tokens)
            self.cached_prompt_tokens += seq.cached_tokens
        seq.status = Status.RUNNING
        self.running.append(seq)
        return Chunk(seq, start, end)

    def _preempt(self, seq: Sequence) -> None:
        """Free seq's blocks and queue it first, to be recomputed from its tokens."""
        self.running.remove(seq)
        self.blocks.free(seq.blocks)
        seq.num_computed = 0
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

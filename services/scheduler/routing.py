"""Which worker runs a request: prefix-cache hits first, load second.

Each candidate's cost is counted in KV blocks:

    cost = blocks of the prompt it would have to prefill (prompt blocks - cached hit)
         + blocks of the requests already in flight on it (+1 per request)

so with equal load the worker holding the longest prefix wins, with equal hits the
least loaded wins, and a hot prefix does not pile every request onto one worker
once the queue there costs more than recomputing the prefix elsewhere. Ties go to
the worker that was given fewer requests so far, so an idle mesh alternates.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass
class WorkerState:
    """What the scheduler knows about one live worker."""

    worker_id: str
    identity: bytes  # ZeroMQ routing id of its DEALER
    model: str
    block_size: int
    max_model_len: int
    max_num_seqs: int
    total_blocks: int
    last_seen: float = field(default_factory=time.monotonic)
    # from its last heartbeat
    running: int = 0
    waiting: int = 0
    free_blocks: int = 0
    prefill_tokens: int = 0
    cached_tokens: int = 0
    finished: int = 0
    draining: bool = False  # SIGTERM'd: finishes what it runs, gets nothing new
    # the scheduler's own bookkeeping
    inflight: dict[str, int] = field(default_factory=dict)  # request id -> its load in blocks
    load_blocks: int = 0  # sum of inflight's values
    assigned: int = 0  # requests given to it since it registered

    def add(self, request_id: str, load: int) -> None:
        self.inflight[request_id] = load
        self.load_blocks += load
        self.assigned += 1

    def remove(self, request_id: str) -> None:
        self.load_blocks -= self.inflight.pop(request_id, 0)

    def has_room(self) -> bool:
        return not self.draining and len(self.inflight) < self.max_num_seqs

    def request_load(self, prompt_len: int) -> int:
        """A request's load in blocks while it runs here."""
        return -(-prompt_len // self.block_size) + 1


def choose_worker(candidates: list[WorkerState], prompt_len: int, hits: dict[str, int]) -> WorkerState | None:
    """The cheapest candidate with room, or None when every one is full.

    hits: worker id -> leading prompt blocks it holds in its prefix cache.
    """
    best, best_key = None, None
    for w in candidates:
        if not w.has_room():
            continue
        prompt_blocks = -(-prompt_len // w.block_size)
        cost = max(0, prompt_blocks - hits.get(w.worker_id, 0)) + w.load_blocks
        key = (cost, len(w.inflight), w.assigned, w.worker_id)
        if best_key is None or key < best_key:
            best, best_key = w, key
    return best

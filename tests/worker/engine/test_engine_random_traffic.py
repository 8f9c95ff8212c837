"""Seeded random traffic: odd block sizes, tight caches, shared prefixes, late arrivals and aborts.

Every greedy request that is not aborted must produce exactly the tokens it
produces alone in a contiguous cache, whatever the batching, chunking, prefix
reuse, window release and preemption did on the way.
"""

from __future__ import annotations

import random

import pytest
from engine_helpers import generate_contiguous, greedy, prompt

CONFIGS = [
    # block_size, blocks per group, max_num_batched_tokens, max_num_seqs, cache tight enough to preempt
    (3, 40, 11, 4, True),
    (5, 24, 64, 8, True),
    (1, 120, 9, 3, False),
    (8, 14, 20, 6, True),
]


@pytest.mark.parametrize("block_size, num_blocks, budget, max_seqs, tight", CONFIGS)
def test_random_traffic_matches_alone(make_engine, small_model, block_size, num_blocks, budget, max_seqs, tight):
    rng = random.Random(block_size * 1000 + num_blocks)
    engine = make_engine(block_size=block_size, num_blocks=num_blocks, max_num_batched_tokens=budget,
                         max_num_seqs=max_seqs)
    stems = [prompt(rng.randrange(10, 40), seed=rng.randrange(10**6)) for _ in range(3)]
    requests = {}
    for i in range(10):
        tokens = rng.choice(stems)[: rng.randrange(5, 40)] + prompt(rng.randrange(1, 12), seed=i)
        requests[f"r{i}"] = (tokens, greedy(rng.randrange(1, 14)))
    pending = list(requests)
    aborted = set()
    produced: dict[str, list[int]] = {}
    finish: dict[str, str] = {}
    steps = 0
    while pending or engine.has_work():
        if pending and rng.random() < 0.5:
            name = pending.pop(0)
            engine.add_request(name, *requests[name])
        live = [r for r in engine.requests if r not in aborted]
        if live and rng.random() < 0.04:
            victim = rng.choice(live)
            assert engine.abort(victim)
            aborted.add(victim)
        for out in engine.step():
            produced.setdefault(out.request_id, []).extend(out.token_ids)
            if out.finished:
                finish[out.request_id] = out.finish_reason
        steps += 1
        assert steps < 2000
    stats = engine.stats()
    assert stats.cached_prompt_tokens > 0  # the shared stems were reused
    assert (stats.num_preemptions > 0) == tight
    assert set(finish) == set(requests)
    for name, (tokens, params) in requests.items():
        if name in aborted:
            assert finish[name] == "abort"
            continue
        assert finish[name] == "length", name
        assert produced[name] == generate_contiguous(small_model, tokens, params).token_ids, name

"""choose_worker: prefix hits against load."""

from __future__ import annotations

from services.scheduler.routing import WorkerState, choose_worker


def worker(name: str, max_num_seqs: int = 4, block_size: int = 16) -> WorkerState:
    return WorkerState(name, name.encode(), "m", block_size, 4096, max_num_seqs, 1000)


def test_longest_hit_wins_at_equal_load():
    a, b = worker("a"), worker("b")
    assert choose_worker([a, b], 160, {"b": 6, "a": 2}) is b


def test_least_loaded_wins_at_equal_hits():
    a, b = worker("a"), worker("b")
    a.add("x", 3)
    assert choose_worker([a, b], 64, {}) is b


def test_a_hot_prefix_spills_over_once_its_worker_is_busy():
    a, b = worker("a", max_num_seqs=64), worker("b", max_num_seqs=64)
    for i in range(4):
        a.add(f"r{i}", 11)  # four 160-token requests in flight
    # a holds 8 of 10 blocks: cost 2 + 44 there, 10 on the idle worker
    assert choose_worker([a, b], 160, {"a": 8}) is b


def test_idle_workers_alternate():
    a, b = worker("a"), worker("b")
    first = choose_worker([a, b], 16, {})
    first.add("r0", 2)
    first.remove("r0")
    assert choose_worker([a, b], 16, {}) is not first


def test_full_workers_are_skipped_and_none_when_all_are_full():
    a, b = worker("a", max_num_seqs=1), worker("b", max_num_seqs=1)
    a.add("x", 1)
    assert choose_worker([a, b], 16, {"a": 1}) is b
    b.add("y", 1)
    assert choose_worker([a, b], 16, {}) is None
    a.remove("x")
    assert a.load_blocks == 0 and choose_worker([a, b], 16, {}) is a

"""AsyncEngine: streams per request over the background step loop, aborts, idle cost, shutdown."""

from __future__ import annotations

import asyncio
import random
import time

import pytest
from engine_helpers import generate_contiguous, greedy, prompt

from services.worker.engine import AsyncEngine, EngineInputError, EngineShutDown
from shared.block_hash import prefix_hashes


@pytest.fixture
def async_engine(make_engine):
    engine = AsyncEngine(make_engine())
    yield engine
    engine.shutdown()
    assert not engine.running


async def collect(engine: AsyncEngine, request_id: str, tokens: list[int], params):
    outs = [out async for out in engine.generate(request_id, tokens, params)]
    return outs


async def wait_all_free(engine: AsyncEngine, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stats = engine.stats()
        if stats.free_blocks == stats.total_blocks and not stats.num_running and not stats.num_waiting:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"blocks still held: {engine.stats()}")


async def test_concurrent_generations_match_the_reference(async_engine, small_model):
    lengths = [5, 23, 41]
    results = await asyncio.gather(*(collect(async_engine, f"r{n}", prompt(n, seed=n), greedy(10)) for n in lengths))
    for n, outs in zip(lengths, results):
        assert [t for o in outs for t in o.token_ids] == generate_contiguous(small_model, prompt(n, seed=n), greedy(10)).token_ids
        assert outs[-1].finish_reason == "length" and all(not o.finished for o in outs[:-1])
        assert all(o.request_id == f"r{n}" for o in outs)
    await wait_all_free(async_engine)
    assert async_engine.stats().requests_finished == 3


async def test_bad_input_raises_before_any_output(async_engine):
    stream = async_engine.generate("bad", [], greedy(4))
    with pytest.raises(EngineInputError, match="empty"):
        await stream.__anext__()
    with pytest.raises(EngineInputError, match="max_tokens"):
        async for _ in async_engine.generate("bad2", [1, 2], greedy(1000)):
            pass
    outs = await collect(async_engine, "good", prompt(5, seed=5), greedy(3))
    assert outs[-1].finish_reason == "length"


async def test_duplicate_running_id_is_refused(async_engine):
    first = async_engine.generate("same", prompt(23, seed=1), greedy(20))
    out = await first.__anext__()
    assert out.request_id == "same"
    with pytest.raises(EngineInputError, match="already running"):
        await async_engine.generate("same", [1, 2], greedy(2)).__anext__()
    rest = [o async for o in first]
    assert rest[-1].finish_reason == "length"


async def test_leaving_the_stream_aborts_the_request(async_engine):
    async for out in async_engine.generate("leave", prompt(41, seed=2), greedy(60)):
        assert not out.finished
        break
    await wait_all_free(async_engine)
    assert async_engine.stats().requests_finished == 1


async def test_cancelled_consumer_aborts_the_request(async_engine):
    started = asyncio.Event()

    async def consume():
        async for _ in async_engine.generate("cancel", prompt(41, seed=3), greedy(60)):
            started.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(started.wait(), 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await wait_all_free(async_engine)


async def test_abort_ends_the_stream_with_abort(async_engine):
    outs = []
    async for out in async_engine.generate("stop-me", prompt(23, seed=4), greedy(60)):
        outs.append(out)
        if len(outs) == 2:
            async_engine.abort("stop-me")
    assert outs[-1].finish_reason == "abort"
    assert sum(len(o.token_ids) for o in outs) < 60
    async_engine.abort("unknown-id")  # ignored
    await wait_all_free(async_engine)


async def test_idle_loop_does_not_spin(async_engine):
    await collect(async_engine, "warm", prompt(5, seed=5), greedy(2))
    await asyncio.sleep(0.05)
    cpu = time.process_time()
    await asyncio.sleep(0.5)
    assert time.process_time() - cpu < 0.1


async def test_kv_events_are_drained_once(async_engine):
    tokens = prompt(20, seed=6)
    outs = await collect(async_engine, "ev", tokens, greedy(5))
    generated = [t for o in outs for t in o.token_ids]
    await wait_all_free(async_engine)
    stored, removed = async_engine.drain_kv_events()
    assert stored == prefix_hashes((tokens + generated)[:-1], 4) and removed == []
    assert async_engine.drain_kv_events() == ([], [])


async def test_shutdown_ends_open_streams(make_engine):
    engine = AsyncEngine(make_engine())
    stream = engine.generate("open", prompt(23, seed=7), greedy(100))
    first = await stream.__anext__()
    assert not first.finished
    await asyncio.to_thread(engine.shutdown)
    rest = [o async for o in stream]
    assert rest and rest[-1].finish_reason == "abort"
    assert not engine.running
    with pytest.raises(EngineShutDown):
        await engine.generate("late", [1, 2], greedy(2)).__anext__()
    stats = engine.stats()
    assert stats.free_blocks == stats.total_blocks


async def test_abort_right_after_submit_then_the_id_is_reused(async_engine, small_model):
    stream = async_engine.generate("quick", prompt(23, seed=4), greedy(60))
    first = asyncio.create_task(stream.__anext__())
    await asyncio.sleep(0)  # the stream is registered and its add queued
    async_engine.abort("quick")
    outs = [await first] + [o async for o in stream]
    assert outs[-1].finish_reason == "abort"
    assert sum(len(o.token_ids) for o in outs) < 60
    await wait_all_free(async_engine)
    again = await collect(async_engine, "quick", prompt(23, seed=4), greedy(6))
    expected = generate_contiguous(small_model, prompt(23, seed=4), greedy(6)).token_ids
    assert [t for o in again for t in o.token_ids] == expected


async def test_many_streams_with_random_cancellations(make_engine, small_model):
    engine = AsyncEngine(make_engine(num_blocks=30, max_num_seqs=6, max_num_batched_tokens=24))
    rng = random.Random(0)
    plans = {f"c{i}": (prompt(rng.randrange(3, 30), seed=200 + i), rng.choice([None, 1, 3])) for i in range(16)}

    async def consume(name: str):
        tokens, leave_after = plans[name]
        outs = []
        async for out in engine.generate(name, tokens, greedy(8)):
            outs.append(out)
            if leave_after is not None and len(outs) >= leave_after:
                break
        return outs

    try:
        results = await asyncio.wait_for(asyncio.gather(*(consume(n) for n in plans)), 60)
        await wait_all_free(engine)
        for name, outs in zip(plans, results):
            tokens, leave_after = plans[name]
            if leave_after is None:
                assert outs[-1].finish_reason == "length"
                got = [t for o in outs for t in o.token_ids]
                assert got == generate_contiguous(small_model, tokens, greedy(8)).token_ids, name
    finally:
        engine.shutdown()

"""The scheduler over real sockets and real Redis: admission, routing, relay, failures."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis
from scheduler_peers import register, wait_for

from shared import protocol
from shared.block_hash import prefix_hashes
from shared.protocol import Abort, Heartbeat, KvEvent, Ping, Pong, Register, Resync, SamplingParams, Submit, TokenEvent

pytestmark = pytest.mark.asyncio(loop_scope="module")

PROMPT = list(range(100, 140))  # 10 blocks of 4


def submit(request_id: str, tokens=PROMPT, max_tokens: int = 4) -> Submit:
    return Submit(request_id, list(tokens), SamplingParams(max_tokens=max_tokens), trace={})


async def test_pong_says_ready_only_with_a_live_worker(scheduler_factory):
    _, formatter, worker = await scheduler_factory()
    f = formatter()
    await f.send(Ping(sent_at=1.5))
    pong = await f.recv()
    assert pong == Pong(sent_at=1.5, ready=False, models=[], workers=0)
    await register(worker(), "w0", model="gpt-oss-tiny")
    await asyncio.sleep(0.1)
    await f.send(Ping(sent_at=2.0))
    assert await f.recv() == Pong(sent_at=2.0, ready=True, models=["gpt-oss-tiny"], workers=1, max_model_len=4096)


async def test_no_worker_answers_503_at_once(scheduler_factory):
    _, formatter, _ = await scheduler_factory()
    f = formatter()
    await f.send(submit("r1"))
    event = await f.recv(timeout=1.0)
    assert (event.request_id, event.finish_reason, event.status) == ("r1", "error", 503)


async def test_tokens_are_relayed_to_the_submitting_formatter(scheduler_factory):
    _, formatter, worker = await scheduler_factory()
    w = worker()
    await register(w, "w0")
    f1, f2 = formatter(), formatter()
    await asyncio.sleep(0.1)
    await f1.send(submit("a"))
    await f2.send(submit("b"))
    got = {}
    for _ in range(2):
        msg = await w.recv()
        assert isinstance(msg, Submit)
        got[msg.request_id] = msg
    assert got["a"].token_ids == PROMPT and got["a"].params.max_tokens == 4
    # one worker message may carry several frames: one engine step's events
    await w.send_raw(
        protocol.encode(TokenEvent("b", token_ids=[7, 8], worker_id="w0")),
        protocol.encode(TokenEvent("a", token_ids=[5], worker_id="w0")),
        protocol.encode(TokenEvent("a", token_ids=[6], finish_reason="length", prompt_tokens=40, worker_id="w0")),
    )
    assert (await f1.recv()).token_ids == [5]
    last = await f1.recv()
    assert (last.token_ids, last.finish_reason, last.prompt_tokens) == ([6], "length", 40)
    assert f1.last_message_frames == 2  # relayed on together, in order
    assert (await f2.recv()).token_ids == [7, 8]
    assert await f1.silent(0.2) == []
    # a finished request is forgotten: a late event for it is answered with an Abort
    await w.send(TokenEvent("a", token_ids=[9], worker_id="w0"))
    assert await w.recv(skip=(Resync,)) == Abort("a", "unknown request")
    assert await f1.silent(0.1) == []


async def test_index_follows_kv_events_and_routing_follows_the_index(scheduler_factory, redis_server):
    scheduler, formatter, worker = await scheduler_factory()
    a, b = worker(), worker()
    await register(a, "wa")
    await register(b, "wb")
    f = formatter()
    hashes = prefix_hashes(PROMPT, 4)
    await b.send(KvEvent("wb", stored=hashes[:8]))
    client = aioredis.Redis.from_url(redis_server.url, decode_responses=True)

    async def indexed():
        return await client.smembers(f"rose:kv:{hashes[7]}") == {"wb"}

    await wait_for(indexed, what="wb's blocks in the index")
    assert await client.smembers("rose:kvw:wb") == {str(h) for h in hashes[:8]}
    assert await scheduler.index.longest_prefix(hashes) == {"wb": 8}
    # the same prompt goes to the worker holding its prefix, every time
    for i in range(3):
        await f.send(submit(f"hot{i}"))
        routed = await b.recv(timeout=2.0)
        assert routed.request_id == f"hot{i}"
        await b.send(TokenEvent(f"hot{i}", finish_reason="stop", worker_id="wb"))
        assert (await f.recv()).request_id == f"hot{i}"
    assert await a.silent(0.1) == []
    # a prompt nobody holds goes to the idle worker that was given fewer requests
    await f.send(submit("cold", tokens=list(range(500, 540))))
    assert (await a.recv()).request_id == "cold"

    # evictions and a cleared cache leave the index
    await b.send(KvEvent("wb", removed=hashes[4:8]))
    await wait_for(lambda: scheduler.index.longest_prefix(hashes), what="index update")
    await wait_for(lambda: _eq(scheduler.index.longest_prefix(hashes), {"wb": 4}), what="eviction applied")
    await b.send(KvEvent("wb", cleared=True))
    await wait_for(lambda: _eq(client.exists("rose:kvw:wb"), 0), what="cleared worker set")
    assert await scheduler.index.longest_prefix(hashes) == {}
    assert await client.smembers(f"rose:kv:{hashes[0]}") == set()
    await client.aclose()


async def _eq(awaitable, expected) -> bool:
    return await awaitable == expected


async def test_full_workers_queue_then_429(scheduler_factory):
    _, formatter, worker = await scheduler_factory(max_queue=2)
    w = worker()
    await register(w, "w0", max_num_seqs=1)
    f = formatter()
    await asyncio.sleep(0.1)
    for i in range(4):
        await f.send(submit(f"r{i}"))
    assert (await w.recv()).request_id == "r0"
    rejected = await f.recv(timeout=1.0)
    assert (rejected.request_id, rejected.finish_reason, rejected.status) == ("r3", "error", 429)
    assert await w.silent(0.2, skip=(Resync,)) == []  # r1, r2 wait in the queue
    await w.send(TokenEvent("r0", token_ids=[1], finish_reason="stop", worker_id="w0"))
    assert (await f.recv()).request_id == "r0"
    assert (await w.recv()).request_id == "r1"  # the queue moves in order
    # an aborted queued request ends at once and never reaches the worker
    await f.send(Abort("r2"))
    ended = await f.recv()
    assert (ended.request_id, ended.finish_reason) == ("r2", "abort")
    await w.send(TokenEvent("r1", finish_reason="stop", worker_id="w0"))
    assert (await f.recv()).request_id == "r1"
    assert await w.silent(0.2) == []


async def test_bad_frames_are_dropped_and_serving_goes_on(scheduler_factory):
    _, formatter, worker = await scheduler_factory()
    f, w = formatter(), worker()
    import msgpack

    bad = [
        (b"\xc1garbage",),
        (msgpack.packb([99, "Ping", {}]),),
        (msgpack.packb([1, "NoSuchMessage", {}]),),
        (msgpack.packb([1, "Submit", {"request_id": 5, "token_ids": [1], "params": {}}]),),
        (msgpack.packb([1, "Submit", {"request_id": "x", "token_ids": "abc", "params": {}}]),),
        (b"one", b"two"),
        (msgpack.packb([1, "Register", {"worker_id": "w", "model": "m"}]),),
    ]
    for parts in bad:
        await f.send_raw(*parts)
        await w.send_raw(*parts)
    # a Register with impossible sizes is refused, not trusted
    await w.send(Register("bogus", "m", 100, block_size=0, total_blocks=1, max_num_seqs=0))
    await f.send(Ping(sent_at=3.0))
    pong = await f.recv()
    assert pong.sent_at == 3.0 and pong.workers == 0
    await register(w, "w0")
    await asyncio.sleep(0.1)
    await f.send(submit("ok"))
    assert (await w.recv(skip=(Resync,))).request_id == "ok"
    # an empty prompt and a duplicate id are the client's fault: 400
    await f.send(submit("empty", tokens=[]))
    await f.send(submit("ok"))
    errors = {(e.request_id, e.status) for e in [await f.recv(), await f.recv()]}
    assert errors == {("empty", 400), ("ok", 400)}


async def test_prompt_longer_than_every_context_is_400(scheduler_factory):
    _, formatter, worker = await scheduler_factory()
    w = worker()
    await register(w, "w0", max_model_len=32)
    f = formatter()
    await asyncio.sleep(0.1)
    await f.send(submit("long", tokens=list(range(40))))
    event = await f.recv()
    assert (event.status, event.finish_reason) == (400, "error")
    assert "32" in event.error


async def test_dead_worker_requests_rerun_or_end_with_503(scheduler_factory, redis_server):
    scheduler, formatter, worker = await scheduler_factory(heartbeat_timeout=0.4)
    a = worker()
    await register(a, "wa", max_num_seqs=8)
    f = formatter()
    await a.send(KvEvent("wa", stored=prefix_hashes(PROMPT, 4)))
    await asyncio.sleep(0.1)
    await f.send(submit("streamed"))
    await f.send(submit("fresh"))
    assert {(await a.recv()).request_id, (await a.recv()).request_id} == {"streamed", "fresh"}
    await a.send(TokenEvent("streamed", token_ids=[9], worker_id="wa"))
    assert (await f.recv()).token_ids == [9]
    b = worker()
    await register(b, "wb")
    a.stop_heartbeats()  # wa goes silent
    # the request that streamed nothing runs again on wb; the other ends with 503
    rerun = await b.recv(timeout=3.0)
    assert isinstance(rerun, Submit) and rerun.request_id == "fresh"
    ended = await f.recv(timeout=3.0)
    assert (ended.request_id, ended.finish_reason, ended.status) == ("streamed", "error", 503)
    # the silent worker is told to stop both, and its index entries are gone
    aborts = {m.request_id for m in await a.silent(0.3) if isinstance(m, Abort)}
    assert aborts == {"streamed", "fresh"}
    await wait_for(lambda: _eq(scheduler.index.blocks_of("wa"), set()), what="wa's entries removed")
    assert "wa" not in scheduler.workers
    # late tokens of the dead worker's requests are not relayed
    await a.send(TokenEvent("fresh", token_ids=[1], worker_id="wa"))
    await b.send(TokenEvent("fresh", token_ids=[2], finish_reason="stop", worker_id="wb"))
    done = await f.recv()
    assert (done.request_id, done.token_ids, done.worker_id) == ("fresh", [2], "wb")


async def test_silent_formatter_gets_its_requests_aborted(scheduler_factory):
    _, formatter, worker = await scheduler_factory(heartbeat_timeout=0.3)
    w = worker()
    await register(w, "w0")
    f = formatter()
    await f.send(Ping())
    await f.recv()
    await f.send(submit("orphan"))
    assert (await w.recv()).request_id == "orphan"
    abort = await w.recv(timeout=2.0)  # the formatter never pings again
    assert abort == Abort("orphan", "formatter gone")


async def test_abort_from_the_formatter_reaches_the_worker(scheduler_factory):
    _, formatter, worker = await scheduler_factory()
    w = worker()
    await register(w, "w0")
    f, other = formatter(), formatter()
    await asyncio.sleep(0.1)
    await f.send(submit("r"))
    assert (await w.recv()).request_id == "r"
    await other.send(Abort("r"))  # not its request: ignored
    await f.send(Abort("r", "client gone"))
    assert await w.recv() == Abort("r", "client gone")
    await w.send(TokenEvent("r", finish_reason="abort", worker_id="w0"))
    assert (await f.recv()).finish_reason == "abort"


async def test_unknown_worker_is_asked_to_resync_and_orphans_are_aborted(scheduler_factory):
    """What a worker sees after the scheduler restarted."""
    _, formatter, worker = await scheduler_factory()
    w = worker()
    await w.send(Heartbeat("w-old", free_blocks=1, total_blocks=1))
    assert isinstance(await w.recv(), Resync)
    await w.send(TokenEvent("lost", token_ids=[1], worker_id="w-old"))
    assert await w.recv() == Abort("lost", "unknown request")


async def test_redis_outage_keeps_routing_and_rebuilds_the_index(scheduler_factory, redis_server):
    scheduler, formatter, worker = await scheduler_factory()
    w = worker()
    await register(w, "w0")
    f = formatter()
    hashes = prefix_hashes(PROMPT, 4)
    await w.send(KvEvent("w0", stored=hashes))
    await wait_for(lambda: _eq(scheduler.index.longest_prefix(hashes), {"w0": 10}), what="indexed")

    redis_server.stop()
    await f.send(submit("during-outage"))
    assert (await w.recv(timeout=2.0)).request_id == "during-outage"
    assert not scheduler.index.available

    redis_server.start()  # same port, empty
    resync = await w.recv(timeout=5.0)
    assert isinstance(resync, Resync)
    # the worker answers as services/worker/main.py does: Register + its whole cache
    await w.send(Register("w0", "tiny", 4096, 4, 100, 8))
    await w.send(KvEvent("w0", stored=hashes, cleared=True))
    await wait_for(lambda: _eq(scheduler.index.longest_prefix(hashes), {"w0": 10}), what="index rebuilt")
    # the request that ran through the outage is still tracked on the same worker
    await w.send(TokenEvent("during-outage", finish_reason="stop", worker_id="w0"))
    assert (await f.recv()).request_id == "during-outage"


async def test_a_draining_worker_gets_no_new_requests(scheduler_factory):
    scheduler, formatter, worker = await scheduler_factory()
    a, b = worker(), worker()
    await register(a, "wa")
    await b.send(Register("wb", "tiny", 4096, 4, 100, 8))
    b.start_heartbeats("wb", free_blocks=100, total_blocks=100, draining=True)
    f = formatter()
    await wait_for(lambda: "wb" in scheduler.workers and scheduler.workers["wb"].draining, what="wb draining")
    for i in range(4):
        await f.send(submit(f"r{i}", tokens=list(range(i * 50, i * 50 + 40))))
    assert sorted([(await a.recv()).request_id for _ in range(4)]) == ["r0", "r1", "r2", "r3"]
    assert await b.silent(0.2) == []

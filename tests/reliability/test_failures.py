"""Crash recovery and cancellation against a real mesh (redis-server, scheduler, two
workers, a formatter, the gateway; each its own process):

- SIGKILL a worker during 32 streams: every stream ends (completed, or an error
  event); the scheduler drops the worker from routing and from the Redis prefix
  index, and takes it back when it starts again.
- SIGKILL the scheduler during 32 streams: every stream ends with an error the
  client sees; a new scheduler picks the workers up again.
- Redis restarts empty: the scheduler and gateway reconnect, the workers resend
  their caches and the prefix index is rebuilt.
- 50 clients disconnect mid-stream: the abort reaches the workers (their aborted
  counters and the gateway's metric say so) and every KV block is free again.

After each: no hung request, every KV block free, new requests served.
"""

from __future__ import annotations

import asyncio
import re

import httpx
import pytest
import redis

from .harness import (
    MODEL,
    assert_serving,
    kv_all_free,
    ready_workers,
    restart,
    stream_body,
    streams_with_event,
    wait_until,
    worker_stats,
)

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="module")]

WORKERS = ("worker-0", "worker-1")
STREAMS = 32
MAX_TOKENS = 32


@pytest.fixture(scope="module")
def mesh2(mesh):
    # Rate limits on, so the gateway talks to Redis on every request too.
    return mesh(formatters=1, workers=2, env={"ROSE_RATE_LIMIT_RPM": "1000000", "ROSE_MAX_MODEL_LEN": "1024"})


@pytest.fixture(scope="module")
def store(mesh2):
    client = redis.Redis.from_url(mesh2.redis_url, decode_responses=True, socket_timeout=2)
    yield client
    client.close()


def indexed_blocks(store: redis.Redis, worker_id: str) -> int:
    try:
        return store.scard(f"rose:kvw:{worker_id}")
    except redis.RedisError:
        return -1


async def fill_index(url: str) -> None:
    """Requests whose prompts span full blocks, so both workers index some."""
    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        replies = await asyncio.gather(*(
            http.post("/v1/completions", json={"model": MODEL, "prompt": list(range(7000 + 100 * i, 7040 + 100 * i)), "max_tokens": 2})
            for i in range(8)
        ))
    assert all(r.status_code == 200 for r in replies), [r.text for r in replies]


def gateway_metric(url: str, name: str, labels: str) -> float:
    text = httpx.get(url + "/metrics", timeout=5).text
    match = re.search(rf"^{re.escape(name)}{{{re.escape(labels)}}} ([0-9.e+]+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


async def test_sigkill_a_worker_during_32_streams(mesh2, store):
    await fill_index(mesh2.url)
    wait_until(lambda: indexed_blocks(store, "worker-1") > 0, 5.0, "worker-1 in the prefix index")

    async def kill():
        await asyncio.to_thread(mesh2.kill, "worker-1")

    outcomes = await streams_with_event(mesh2.url, STREAMS, MAX_TOKENS, kill)
    assert all(o in ("completed", "error") for o in outcomes), outcomes
    assert outcomes.count("completed") >= 1 and outcomes.count("error") >= 1, outcomes
    # out of routing and out of the prefix index
    wait_until(lambda: ready_workers(mesh2.url) == 1, 10.0, "the gateway to report one worker")
    wait_until(lambda: indexed_blocks(store, "worker-1") == 0, 10.0, "worker-1's blocks gone from the index")
    kv_all_free(store, ["worker-0"])
    await assert_serving(mesh2.url)

    # back in: it registers again and takes requests
    restart(mesh2, "worker-1")
    wait_until(lambda: ready_workers(mesh2.url) == 2, 120.0, "worker-1 to register again")
    before = worker_stats(store, "worker-1").get("finished", 0)
    await assert_serving(mesh2.url, requests=8)
    wait_until(lambda: worker_stats(store, "worker-1").get("finished", 0) > before, 5.0, "worker-1 to serve requests")
    kv_all_free(store, WORKERS)


async def test_redis_restart_rebuilds_the_prefix_index(mesh2, store):
    await fill_index(mesh2.url)
    wait_until(lambda: all(indexed_blocks(store, w) > 0 for w in WORKERS), 5.0, "both workers in the prefix index")
    before = {w: indexed_blocks(store, w) for w in WORKERS}
    await asyncio.to_thread(mesh2.kill, "redis")
    # while Redis is away, requests are still served (rate limits fail open, routing by load)
    await assert_serving(mesh2.url, requests=2)
    restart(mesh2, "redis")
    # the new Redis is empty; the workers' resent caches fill it again, with no new request
    wait_until(lambda: all(indexed_blocks(store, w) >= before[w] for w in WORKERS), 15.0, "the prefix index rebuilt")
    wait_until(lambda: all(worker_stats(store, w) for w in WORKERS), 5.0, "worker counters back in Redis")
    await assert_serving(mesh2.url)
    # the gateway reconnected too: its rate-limit buckets are kept in the new Redis
    assert store.keys("rose:ratelimit*"), "no rate-limit keys in the restarted Redis"
    kv_all_free(store, WORKERS)


async def test_50_clients_disconnect_mid_stream(mesh2, store):
    before_gateway = gateway_metric(mesh2.url, "rose_gateway_aborted_requests_total", 'reason="client_gone"')
    wait_until(lambda: all(worker_stats(store, w) for w in WORKERS), 5.0, "worker counters")
    before_workers = sum(worker_stats(store, w).get("aborted", 0) for w in WORKERS)
    clients = 50
    started = 0
    all_started = asyncio.Event()

    async def one(i: int):
        nonlocal started
        async with httpx.AsyncClient(base_url=mesh2.url, timeout=60) as http:
            async with http.stream("POST", "/v1/completions", json=stream_body(i, 400)) as response:
                assert response.status_code == 200
                async for line in response.aiter_lines():
                    if line.startswith("data: "):
                        started += 1
                        if started == clients:
                            all_started.set()
                        await asyncio.Event().wait()  # hold the stream open until cancelled

    tasks = [asyncio.create_task(one(i)) for i in range(clients)]
    await asyncio.wait_for(all_started.wait(), 60)
    for task in tasks:
        task.cancel()  # closes each connection mid-stream
    await asyncio.gather(*tasks, return_exceptions=True)

    wait_until(
        lambda: gateway_metric(mesh2.url, "rose_gateway_aborted_requests_total", 'reason="client_gone"') >= before_gateway + clients,
        10.0, "the gateway to count 50 aborts",
    )
    wait_until(
        lambda: sum(worker_stats(store, w).get("aborted", 0) for w in WORKERS) >= before_workers + clients,
        10.0, "the workers to count 50 aborts",
    )
    stats = kv_all_free(store, WORKERS)
    # the streams were cut short: far fewer tokens than 50 x 400 were generated
    assert all(s["running"] == 0 for s in stats.values())
    await assert_serving(mesh2.url)


async def test_sigkill_the_scheduler_during_32_streams(mesh2, store):
    async def kill():
        await asyncio.to_thread(mesh2.kill, "scheduler")

    outcomes = await streams_with_event(mesh2.url, STREAMS, MAX_TOKENS, kill)
    # accepted requests are not silently lost: each ends with an error (or had just finished)
    assert all(o in ("completed", "error") for o in outcomes), outcomes
    assert outcomes.count("error") >= 1, outcomes
    restart(mesh2, "scheduler")
    wait_until(lambda: ready_workers(mesh2.url) == 2, 30.0, "the new scheduler to take both workers")
    # the workers aborted what the old scheduler had given them
    kv_all_free(store, WORKERS)
    await assert_serving(mesh2.url)

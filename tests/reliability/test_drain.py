"""Graceful drain, service by service, against a real mesh: SIGTERM during 32 streams
stops new work at that service, lets every stream in flight finish, and the process
exits 0 (not killed by its signal). The mesh then serves again once the service is
started anew.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess

import httpx
import pytest
import redis

from .harness import MODEL, assert_serving, kv_all_free, ready_workers, restart, streams_with_event, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="module")]

WORKERS = ("worker-0", "worker-1")
STREAMS = 32
MAX_TOKENS = 24
DRAIN_TIMEOUT_S = 30


@pytest.fixture(scope="module")
def mesh2(mesh):
    return mesh(formatters=2, workers=2, env={"ROSE_DRAIN_TIMEOUT": str(DRAIN_TIMEOUT_S)})


@pytest.fixture(scope="module")
def store(mesh2):
    client = redis.Redis.from_url(mesh2.redis_url, decode_responses=True, socket_timeout=2)
    yield client
    client.close()


async def sigterm_during_streams(mesh, name: str, while_draining=None) -> tuple[list[str], int]:
    """32 streams; SIGTERM `name` once all have started; (outcomes, the child's exit code)."""
    child = mesh.child(name)

    async def terminate():
        child.expected_exit = True
        child.process.send_signal(signal.SIGTERM)
        if while_draining is not None:
            await while_draining()

    outcomes = await streams_with_event(mesh.url, STREAMS, MAX_TOKENS, terminate)
    try:
        code = await asyncio.to_thread(child.process.wait, DRAIN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        child.process.kill()
        raise AssertionError(f"{name} did not exit after its drain") from None
    return outcomes, code


async def test_gateway_drains(mesh2, store):
    seen = {}

    async def while_draining():
        async with httpx.AsyncClient(base_url=mesh2.url, timeout=5) as http:
            ready = await http.get("/ready")
            refused = await http.post("/v1/completions", json={"model": MODEL, "prompt": [1, 2], "max_tokens": 2})
        seen.update(ready=ready.status_code, new=refused.status_code, retry=refused.headers.get("retry-after"))

    outcomes, code = await sigterm_during_streams(mesh2, "gateway", while_draining)
    assert outcomes == ["completed"] * STREAMS, outcomes
    assert seen == {"ready": 503, "new": 503, "retry": "1"}, seen
    assert code == 0
    restart(mesh2, "gateway")
    mesh2.wait_ready(60)
    kv_all_free(store, WORKERS)
    await assert_serving(mesh2.url)


async def test_formatter_drains(mesh2, store):
    outcomes, code = await sigterm_during_streams(mesh2, "formatter-1")
    assert outcomes == ["completed"] * STREAMS, outcomes
    assert code == 0
    await assert_serving(mesh2.url)
    restart(mesh2, "formatter-1")
    wait_until(lambda: httpx.get(mesh2.url + "/ready").json().get("formatters") == 2, 60.0, "formatter-1 back")
    kv_all_free(store, WORKERS)
    await assert_serving(mesh2.url)


async def test_worker_drains(mesh2, store):
    outcomes, code = await sigterm_during_streams(mesh2, "worker-1")
    assert outcomes == ["completed"] * STREAMS, outcomes
    assert code == 0
    wait_until(lambda: ready_workers(mesh2.url) == 1, 10.0, "the scheduler to drop worker-1")
    await assert_serving(mesh2.url)
    restart(mesh2, "worker-1")
    wait_until(lambda: ready_workers(mesh2.url) == 2, 120.0, "worker-1 back")
    kv_all_free(store, WORKERS)
    await assert_serving(mesh2.url)


async def test_scheduler_drains(mesh2, store):
    outcomes, code = await sigterm_during_streams(mesh2, "scheduler")
    assert outcomes == ["completed"] * STREAMS, outcomes
    assert code == 0
    restart(mesh2, "scheduler")
    wait_until(lambda: ready_workers(mesh2.url) == 2, 30.0, "the new scheduler to take both workers")
    kv_all_free(store, WORKERS)
    await assert_serving(mesh2.url)

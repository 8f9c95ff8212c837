"""A scheduler running in the test's event loop, real Redis, and protocol peers.

The peers are plain ZeroMQ DEALER sockets speaking shared.protocol, standing where
a formatter and a worker process would connect; everything the scheduler does
goes through its real sockets and its real Redis.
"""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
from scheduler_peers import Peer, RedisServer

from services.launcher import free_port
from services.scheduler.service import Scheduler
from shared.config import Settings


@pytest.fixture
def redis_server(tmp_path):
    server = RedisServer(str(tmp_path))
    server.start()
    yield server
    server.stop()


@pytest.fixture
async def scheduler_factory(redis_server):
    """start(**settings) -> (scheduler, formatter peer factory, worker peer factory)."""
    running: list[tuple[Scheduler, asyncio.Task]] = []
    peers: list[Peer] = []

    async def start(**overrides):
        values = dict(
            scheduler_frontend=f"tcp://127.0.0.1:{free_port()}",
            scheduler_backend=f"tcp://127.0.0.1:{free_port()}",
            redis_url=redis_server.url,
            heartbeat_interval=0.05,
            heartbeat_timeout=0.5,
        )
        values.update(overrides)
        settings = dataclasses.replace(Settings(), **values)
        scheduler = Scheduler(settings)
        task = asyncio.get_running_loop().create_task(scheduler.run())
        running.append((scheduler, task))
        await asyncio.sleep(0.05)
        assert not task.done(), task.exception()

        def formatter() -> Peer:
            peers.append(Peer(settings.scheduler_frontend))
            return peers[-1]

        def worker() -> Peer:
            peers.append(Peer(settings.scheduler_backend))
            return peers[-1]

        return scheduler, formatter, worker

    yield start
    for peer in peers:
        peer.close()
    for scheduler, task in running:
        crashed = task.done() and not task.cancelled() and task.exception()
        task.cancel()
        await asyncio.wait_for(asyncio.gather(task, return_exceptions=True), 10)
        assert not crashed, f"the scheduler's loops died: {crashed!r}"



"""Protocol peers for scheduler tests: DEALER sockets where formatters and workers connect,
and a redis-server a test can stop and start again."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from collections import deque

import pytest
import zmq
import zmq.asyncio

from services.launcher import free_port, redis_answers
from shared import protocol
from shared.protocol import Heartbeat, Register


class Peer:
    """One DEALER connected to a scheduler endpoint."""

    def __init__(self, endpoint: str):
        self.sock = zmq.asyncio.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)
        self._beat: asyncio.Task | None = None
        self._frames: deque[bytes] = deque()  # of the last message, not yet read
        self.last_message_frames = 0

    async def send(self, message) -> None:
        await self.sock.send_multipart([protocol.encode(message)])

    async def send_raw(self, *parts: bytes) -> None:
        await self.sock.send_multipart(list(parts))

    async def recv(self, timeout: float = 3.0, skip=()):
        """The next message (skipping the given types); TimeoutError if none comes."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no message")
            if not self._frames:  # a message may carry several frames (events relayed together)
                self._frames.extend(await asyncio.wait_for(self.sock.recv_multipart(), left))
                self.last_message_frames = len(self._frames)
            msg = protocol.decode(self._frames.popleft())
            if not isinstance(msg, tuple(skip)):
                return msg

    async def silent(self, seconds: float, skip=()) -> list:
        """Messages (other than `skip` types) that arrive within `seconds`."""
        got = []
        try:
            while True:
                got.append(await self.recv(seconds, skip))
        except TimeoutError:
            return got

    def start_heartbeats(self, worker_id: str, interval: float = 0.05, **fields) -> None:
        async def beat():
            while True:
                await self.send(Heartbeat(worker_id, **fields))
                await asyncio.sleep(interval)

        self._beat = asyncio.get_running_loop().create_task(beat())

    def stop_heartbeats(self) -> None:
        if self._beat is not None:
            self._beat.cancel()

    def close(self) -> None:
        self.stop_heartbeats()
        self.sock.close(0)


class RedisServer:
    """A private redis-server that a test can stop and start again on the same port."""

    def __init__(self, folder: str):
        self.port = free_port()
        self.folder = folder
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not installed (.ci/run installs it with apt-get)")
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", self.folder],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while not redis_answers("127.0.0.1", self.port):
            if time.monotonic() > deadline:
                pytest.fail("redis-server did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None


async def register(worker: Peer, worker_id: str, block_size: int = 4, max_num_seqs: int = 8, model: str = "tiny", max_model_len: int = 4096) -> None:
    """Register a worker peer and keep it alive with heartbeats."""
    await worker.send(Register(worker_id, model, max_model_len, block_size, total_blocks=100, max_num_seqs=max_num_seqs))
    worker.start_heartbeats(worker_id, free_blocks=100, total_blocks=100)


async def wait_for(predicate, timeout: float = 3.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")

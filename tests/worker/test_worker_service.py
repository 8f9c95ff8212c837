"""The worker process's ZeroMQ side: a real engine on the tiny checkpoint, a ROUTER where
the scheduler binds, and the protocol between them."""

from __future__ import annotations

import asyncio
import dataclasses
import time

import pytest
import zmq
import zmq.asyncio

from services.launcher import free_port
from services.worker.engine import Engine
from services.worker.main import WorkerService
from shared import protocol
from shared.block_hash import prefix_hashes
from shared.config import Settings
from shared.protocol import Abort, Heartbeat, KvEvent, Register, Resync, SamplingParams, Submit, TokenEvent

pytestmark = pytest.mark.asyncio(loop_scope="module")

BLOCK = 16
PROMPT = [200006, 17360, 200008] + list(range(1000, 1061))  # 64 tokens = 4 blocks


class SchedulerEnd:
    """The ROUTER a worker's DEALER connects to; records what the worker says."""

    def __init__(self, endpoint: str):
        self.sock = zmq.asyncio.Context.instance().socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(endpoint)
        self.identity: bytes | None = None
        self.heartbeats: list[Heartbeat] = []
        self.unread: list = []

    async def recv(self, timeout: float = 10.0, want=None):
        """The oldest unread message of type `want` (others stay unread for later calls)."""
        deadline = time.monotonic() + timeout
        while True:
            for i, msg in enumerate(self.unread):
                if want is None or isinstance(msg, want):
                    return self.unread.pop(i)
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no {want}")
            identity, *frames = await asyncio.wait_for(self.sock.recv_multipart(), left)
            self.identity = identity
            for frame in frames:  # the worker batches what it sends in one loop iteration
                msg = protocol.decode(frame)
                if isinstance(msg, Heartbeat):
                    self.heartbeats.append(msg)
                    if want is not Heartbeat:
                        continue
                self.unread.append(msg)

    async def send(self, message) -> None:
        await self.sock.send_multipart([self.identity, protocol.encode(message)])

    async def events_until_finished(self, request_id: str, timeout: float = 30.0) -> list[TokenEvent]:
        events = []
        while True:
            event = await self.recv(timeout, want=TokenEvent)
            assert event.request_id == request_id
            events.append(event)
            if event.finish_reason is not None:
                return events


@pytest.fixture(scope="module")
def engine(tiny_checkpoint):
    settings = dataclasses.replace(Settings(), model=tiny_checkpoint, block_size=BLOCK, max_num_seqs=8, max_model_len=512)
    return Engine.from_settings(settings)


@pytest.fixture(scope="module")
async def worker(engine):
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    settings = dataclasses.replace(
        Settings(), scheduler_backend=endpoint, worker_id="w-test", model_name="tiny", heartbeat_interval=0.05, max_num_seqs=8
    )
    scheduler = SchedulerEnd(endpoint)
    service = WorkerService(settings, engine)
    task = asyncio.get_running_loop().create_task(service.run())
    register = await scheduler.recv(want=Register)
    first_kv = await scheduler.recv(want=KvEvent)
    yield scheduler, service, register, first_kv
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    scheduler.sock.close(0)


async def test_registers_then_clears_its_old_index_entries(worker):
    _, _, register, first_kv = worker
    assert (register.worker_id, register.model, register.block_size, register.max_num_seqs) == ("w-test", "tiny", BLOCK, 8)
    assert register.max_model_len == 512 and register.total_blocks > 0
    assert first_kv == KvEvent("w-test", stored=[], removed=[], cleared=True)


async def test_streams_tokens_and_reports_its_prefix_blocks(worker):
    scheduler, _, register, _ = worker
    await scheduler.send(Submit("r1", PROMPT, SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)))
    events = await scheduler.events_until_finished("r1")
    tokens = [t for e in events for t in e.token_ids]
    assert len(tokens) == 6
    last = events[-1]
    assert (last.finish_reason, last.prompt_tokens, last.worker_id) == ("length", len(PROMPT), "w-test")
    kv = await scheduler.recv(want=KvEvent)
    # the hashes the scheduler routes by: shared/block_hash.py over the prompt's full blocks
    assert prefix_hashes(PROMPT, BLOCK)[:3] == kv.stored[:3]
    # the same prompt again is served from the prefix cache; the heartbeat counts it
    await scheduler.send(Submit("r2", PROMPT, SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)))
    again = await scheduler.events_until_finished("r2")
    assert again[-1].cached_tokens >= 3 * BLOCK
    beat = await scheduler.recv(want=Heartbeat)
    beat = await scheduler.recv(want=Heartbeat)
    assert beat.cached_tokens >= 3 * BLOCK and beat.finished >= 2
    assert beat.prefill_tokens >= len(PROMPT) and beat.free_blocks == beat.total_blocks == register.total_blocks


async def test_abort_ends_the_stream_and_frees_blocks(worker):
    scheduler, _, register, _ = worker
    await scheduler.send(Submit("long", PROMPT, SamplingParams(max_tokens=400, ignore_eos=True)))
    first = await scheduler.recv(want=TokenEvent)
    assert first.request_id == "long" and first.finish_reason is None
    busy = await scheduler.recv(want=Heartbeat)
    assert busy.running == 1 and busy.free_blocks < busy.total_blocks
    await scheduler.send(Abort("long"))
    events = await scheduler.events_until_finished("long")
    assert events[-1].finish_reason == "abort"
    t0 = time.monotonic()
    while True:
        beat = await scheduler.recv(want=Heartbeat)
        if beat.free_blocks == beat.total_blocks and beat.running == 0:
            break
        assert time.monotonic() - t0 < 1.0, "blocks not freed within a second of the abort"


async def test_bad_input_is_a_400_event_and_the_worker_goes_on(worker):
    scheduler, _, _, _ = worker
    await scheduler.send(Submit("bad", [10**9], SamplingParams(max_tokens=2)))
    event = await scheduler.recv(want=TokenEvent)
    assert (event.request_id, event.finish_reason, event.status) == ("bad", "error", 400)
    assert "token" in event.error
    await scheduler.send(Submit("too-long", PROMPT, SamplingParams(max_tokens=10_000)))
    event = await scheduler.recv(want=TokenEvent)
    assert (event.request_id, event.status) == ("too-long", 400)
    await scheduler.sock.send_multipart([scheduler.identity, b"\x00not msgpack"])
    await scheduler.send(Submit("fine", PROMPT[:5], SamplingParams(max_tokens=1)))
    assert (await scheduler.events_until_finished("fine"))[-1].finish_reason in ("length", "stop")


async def test_resync_resends_register_and_the_whole_cache(worker):
    scheduler, service, _, _ = worker
    await scheduler.send(Resync("test"))
    register = await scheduler.recv(want=Register)
    kv = await scheduler.recv(want=KvEvent)
    assert register.worker_id == "w-test"
    assert kv.cleared and set(kv.stored) == service.cached
    assert set(prefix_hashes(PROMPT, BLOCK)[:3]) <= set(kv.stored)


async def test_draining_refuses_new_work_and_says_so(worker):
    scheduler, service, _, _ = worker
    await scheduler.send(Submit("before", PROMPT, SamplingParams(max_tokens=30, ignore_eos=True)))
    assert (await scheduler.recv(want=TokenEvent)).request_id == "before"
    service.drain()
    try:
        beat = await scheduler.recv(want=Heartbeat)
        while not beat.draining:
            beat = await scheduler.recv(want=Heartbeat)
        await scheduler.send(Submit("after", PROMPT, SamplingParams(max_tokens=2)))
        refused = await scheduler.recv(want=TokenEvent)
        while refused.request_id != "after":
            refused = await scheduler.recv(want=TokenEvent)
        assert (refused.finish_reason, refused.status) == ("error", 503)
        # the request that was running goes on to its end
        rest = await scheduler.events_until_finished("before")
        assert rest[-1].finish_reason == "length"
        await asyncio.wait_for(service.drained(), 5)
    finally:
        service.draining = False

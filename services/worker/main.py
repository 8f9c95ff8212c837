"""`rose worker`: one model engine behind a DEALER to the scheduler's backend.

    scheduler --Submit--> worker: engine.generate -> one TokenEvent per engine step
    scheduler --Abort-->  worker: engine.abort (blocks freed at once)
    scheduler --Resync--> worker: Register again + the whole set of cached block hashes
    worker --Register, Heartbeat (every heartbeat_interval), KvEvent--> scheduler

SIGTERM drains: Heartbeats say `draining` so the scheduler routes nothing new here,
running requests finish (up to drain_timeout), then the process exits 0.

What the worker sends in one event-loop iteration goes as one ZeroMQ message of
several frames (one protocol message each): a step's TokenEvents travel together.

The worker keeps its own copy of the block hashes it reported, so it can resend
the full set when the scheduler restarted or Redis came back empty.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import logging
import os
import socket
import time

import zmq
import zmq.asyncio
from opentelemetry.trace import SpanKind, Status, StatusCode

from services.worker.engine import AsyncEngine, Engine, EngineInputError
from shared import protocol
from shared.config import Settings
from shared.lifecycle import serve_until_signalled
from shared.protocol import Abort, FrameError, Heartbeat, KvEvent, Register, Resync, Submit, TokenEvent
from shared.telemetry import extract, setup_tracing, shutdown_tracing, tracer
from shared.zmq_security import CurveKeyError, secure_client

log = logging.getLogger("rose.worker")

KV_EVENT_PERIOD_S = 0.02  # how often new prefix blocks reach the index
HWM = 100_000


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`rose worker` takes only the settings flags (--model, --block-size, ...)."""


def default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class WorkerService:
    """The worker process's ZeroMQ side around one AsyncEngine."""

    def __init__(self, settings: Settings, engine: Engine, context: zmq.asyncio.Context | None = None):
        self.settings = settings
        self.worker_id = settings.worker_id or default_worker_id()
        self.engine = engine
        self.async_engine = AsyncEngine(engine)
        self.ctx = context or zmq.asyncio.Context.instance()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SNDHWM, HWM)
        self.sock.setsockopt(zmq.RCVHWM, HWM)
        secure_client(self.sock, settings)  # CURVE when configured (before connect)
        self.cached: set[int] = set()  # block hashes the scheduler was told about
        self._outbox: list[bytes] = []  # encoded frames waiting for the end of this loop iteration
        self.draining = False
        self.aborted = 0  # requests aborted by the scheduler
        self.running: dict[str, asyncio.Task] = {}
        self.tracer = tracer("rose.worker")

    # ------------------------------------------------------------ lifecycle
    async def run(self) -> None:
        self.sock.connect(self.settings.scheduler_backend)
        log.info("worker %s: serving %s, scheduler at %s", self.worker_id, self.settings.served_model_name, self.settings.scheduler_backend)
        # A fresh engine holds nothing: drop whatever an earlier process of this name left in the index.
        self._register(full_cache=True)
        tasks = [
            asyncio.create_task(self._receive_loop(), name="receive"),
            asyncio.create_task(self._heartbeat_loop(), name="heartbeat"),
            asyncio.create_task(self._kv_event_loop(), name="kv-events"),
        ]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                task.result()
        finally:
            for task in tasks + list(self.running.values()):
                task.cancel()
            await asyncio.gather(*tasks, *self.running.values(), return_exceptions=True)
            self.async_engine.shutdown()
            self.sock.close(0)

    def _register(self, full_cache: bool) -> None:
        stats = self.async_engine.stats()
        self._send(Register(
            worker_id=self.worker_id,
            model=self.settings.served_model_name,
            max_model_len=stats.max_model_len,
            block_size=stats.block_size,
            total_blocks=sum(stats.total_blocks.values()),
            max_num_seqs=self.settings.max_num_seqs,
        ))
        if full_cache:
            self._send(KvEvent(self.worker_id, stored=sorted(self.cached), cleared=True))

    def _send(self, message) -> None:
        """Queue a message; everything queued in one loop iteration leaves as one multi-frame message.

        One engine step wakes every stream's task in the same iteration, so its
        events reach the scheduler together instead of one ZeroMQ message each.
        """
        self._outbox.append(protocol.encode(message))
        if len(self._outbox) == 1:
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        frames, self._outbox = self._outbox, []
        if not frames:
            return
        # Without waiting: a missing scheduler must not stall the engine.
        sent = self.sock.send_multipart(frames, flags=zmq.DONTWAIT)
        if sent.done() and sent.exception() is not None:
            log.warning("dropped %d frames for the scheduler: %s", len(frames), sent.exception())

    # ------------------------------------------------------------ from the scheduler
    async def _receive_loop(self) -> None:
        while True:
            parts = await self.sock.recv_multipart()
            if len(parts) != 1:
                log.warning("dropped a message of %d parts from the scheduler", len(parts))
                continue
            try:
                msg = protocol.decode(parts[0])
            except FrameError as exc:
                log.warning("dropped a bad frame from the scheduler: %s", exc)
                continue
            if isinstance(msg, Submit):
                if self.draining:
                    self._send(TokenEvent(msg.request_id, finish_reason="error", status=503, worker_id=self.worker_id,
                                          error=f"worker {self.worker_id} is shutting down; retry"))
                    continue
                if msg.request_id in self.running:
                    self._send(TokenEvent(msg.request_id, finish_reason="error", status=400, worker_id=self.worker_id,
                                          error=f"request {msg.request_id!r} is already running on {self.worker_id}"))
                    continue
                self.running[msg.request_id] = asyncio.create_task(self._generate(msg))
            elif isinstance(msg, Abort):
                if msg.request_id in self.running:
                    self.aborted += 1
                self.async_engine.abort(msg.request_id)
            elif isinstance(msg, Resync):
                log.info("scheduler asked for a resync (%s)", msg.reason)
                self._register(full_cache=True)
            else:
                log.warning("dropped an unexpected %s from the scheduler", type(msg).__name__)

    async def _generate(self, submit: Submit) -> None:
        """Stream one request's outputs as TokenEvents, one per engine step."""
        request_id = submit.request_id
        span = self.tracer.start_span(
            "worker.generate",
            context=extract(submit.trace),
            kind=SpanKind.INTERNAL,
            attributes={"rose.request_id": request_id, "rose.worker_id": self.worker_id, "rose.prompt_tokens": len(submit.token_ids)},
        )
        completion_tokens = 0
        try:
            async for out in self.async_engine.generate(request_id, submit.token_ids, submit.params):
                if out.token_ids and not completion_tokens:
                    span.add_event("first_token")  # here, on the loop thread: after the engine thread's hand-over
                completion_tokens += len(out.token_ids)
                self._send(TokenEvent(
                    request_id=request_id,
                    token_ids=out.token_ids,
                    logprobs=out.logprobs,
                    top_logprobs=out.top_logprobs,
                    finish_reason=out.finish_reason,
                    prompt_tokens=out.prompt_tokens,
                    cached_tokens=out.cached_tokens,
                    error=out.error,
                    status=500 if out.finish_reason == "error" else 0,
                    worker_id=self.worker_id,
                ))
                if out.finish_reason is not None:
                    span.set_attribute("rose.finish_reason", out.finish_reason)
                    span.set_attribute("rose.cached_tokens", out.cached_tokens)
                    if out.times is not None:
                        for name, ms in out.times.latencies_ms().items():
                            span.set_attribute(f"rose.engine.{name}_ms", round(ms, 3))
                    if out.error:
                        span.set_status(Status(StatusCode.ERROR, out.error))
        except EngineInputError as exc:
            span.set_status(Status(StatusCode.ERROR, str(exc)))
            self._send(TokenEvent(request_id, finish_reason="error", error=str(exc), status=400, worker_id=self.worker_id))
        except asyncio.CancelledError:
            self.async_engine.abort(request_id)
            raise
        except Exception as exc:  # the engine failing one request must not end the worker
            log.exception("request %s failed", request_id)
            span.set_status(Status(StatusCode.ERROR, str(exc)))
            self._send(TokenEvent(request_id, finish_reason="error", error=f"worker error: {exc}", status=500, worker_id=self.worker_id))
        finally:
            span.set_attribute("rose.completion_tokens", completion_tokens)
            span.end()
            self.running.pop(request_id, None)

    # ------------------------------------------------------------ to the scheduler
    def heartbeat(self) -> Heartbeat:
        stats = self.async_engine.stats()
        return Heartbeat(
            worker_id=self.worker_id,
            running=stats.num_running,
            waiting=stats.num_waiting,
            free_blocks=sum(stats.free_blocks.values()),
            total_blocks=sum(stats.total_blocks.values()),
            prefill_tokens=stats.prefill_tokens_computed,
            cached_tokens=stats.cached_prompt_tokens,
            finished=stats.requests_finished,
            aborted=self.aborted,
            draining=self.draining,
        )

    def drain(self) -> None:
        """Take no new request (the scheduler hears it at once); running ones go on."""
        self.draining = True
        log.info("draining: %d requests running, up to %.0fs", len(self.running), self.settings.drain_timeout)
        self._send(self.heartbeat())

    async def drained(self) -> None:
        """Return once nothing runs, or drain_timeout has passed."""
        deadline = time.monotonic() + self.settings.drain_timeout
        while self.running and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    async def _heartbeat_loop(self) -> None:
        while True:
            self._send(self.heartbeat())
            await asyncio.sleep(self.settings.heartbeat_interval)

    async def _kv_event_loop(self) -> None:
        while True:
            await asyncio.sleep(KV_EVENT_PERIOD_S)
            self.flush_kv_events()

    def flush_kv_events(self) -> None:
        """Send the prefix blocks stored and evicted since the last flush."""
        stored, removed = self.async_engine.drain_kv_events()
        if not (stored or removed):
            return
        self.cached.difference_update(removed)
        self.cached.update(stored)
        self._send(KvEvent(self.worker_id, stored=stored, removed=removed))


# ---------------------------------------------------------------- rose worker
def reuse_freed_memory() -> bool:
    """Have glibc serve big allocations from its heap instead of fresh mappings; False off glibc.

    A CPU step allocates several [seqs, vocab] float32 tensors (64 x 201,088 is 51 MB:
    the logits, the sampler's weights). glibc maps anything above its 32 MiB ceiling
    fresh and unmaps it on free, so each one is zero-filled page by page on first
    touch: ~30 ms apiece on the 2-core box, a third of a 64-sequence step
    (docs/BENCHMARKS.md, Mesh overhead). With mmap off and trimming above 1 GiB the
    freed blocks are reused; the heap keeps its high-water mark.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # <malloc.h>
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 1 << 30))


def main(settings: Settings, args: argparse.Namespace | None = None) -> int:
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s worker %(levelname)s %(name)s: %(message)s")
    setup_tracing("worker", settings)
    if settings.device == "cpu" and not reuse_freed_memory():
        log.info("not glibc: big CPU tensors are mapped afresh each step")
    try:
        engine = Engine.from_settings(settings)
    except (OSError, ValueError) as exc:  # CheckpointError is a ValueError
        log.error("cannot load the model at %s: %s", settings.model_path, exc)
        return 1
    try:
        asyncio.run(_serve(settings, engine))
    except CurveKeyError as exc:
        log.error("cannot connect to the scheduler: %s", exc)
        return 2
    finally:
        shutdown_tracing()
    return 0


async def _serve(settings: Settings, engine: Engine) -> None:
    """Serve until SIGTERM/SIGINT; the first drains (running requests finish), a second stops at once."""
    service = WorkerService(settings, engine)

    async def drain() -> None:
        service.drain()
        await service.drained()

    await serve_until_signalled(service.run(), drain)

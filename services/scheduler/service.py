"""The scheduler: admission, routing and relay between formatters and workers.

Two ROUTER sockets: the frontend (formatters: Submit, Abort, Ping) and the backend
(workers: Register, Heartbeat, TokenEvent, KvEvent; the scheduler sends Submit,
Abort, Resync). One request's life here:

    Submit -> admitted (a worker has room) or queued (max_queue) or 429 / 503 / 400
           -> routed (prefix index in Redis, then load) -> Submit to the worker
    TokenEvent from that worker -> relayed byte for byte to the formatter
    finish_reason set -> forgotten; the queue moves

Failures end requests, never leave them hanging: a worker silent past
heartbeat_timeout is dropped, its requests re-run elsewhere when nothing was
streamed yet, else end with a 503 error event; a formatter that stops pinging gets
its requests aborted on the workers.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass, field

import msgpack
import zmq
import zmq.asyncio
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from services.scheduler.prefix_index import PrefixIndex
from services.scheduler.routing import WorkerState, choose_worker
from shared import protocol
from shared.block_hash import prefix_hashes
from shared.config import Settings
from shared.protocol import Abort, FrameError, Heartbeat, KvEvent, Ping, Pong, Register, Resync, Submit, TokenEvent
from shared.telemetry import extract, inject, tracer
from shared.zmq_io import queued
from shared.zmq_security import secure_server

log = logging.getLogger(__name__)

# A request that was on a worker when it died is re-run at most this many times:
# a prompt that crashes workers must not take the whole fleet down.
MAX_RERUNS = 2
# Plenty for bursts of token events; a ROUTER silently drops past its high-water mark.
HWM = 100_000


@dataclass(eq=False)  # compared by identity: queue removal must not compare spans
class Pending:
    """One admitted request, queued or running."""

    submit: Submit
    formatter: bytes  # routing id of the formatter that submitted it
    span: trace.Span
    worker_id: str | None = None  # None while queued
    streamed: bool = False  # a token reached the formatter: it can no longer be re-run
    aborted: bool = False
    reruns: int = 0
    queued_at: float = field(default_factory=time.monotonic)

    @property
    def request_id(self) -> str:
        return self.submit.request_id


class Scheduler:
    """One scheduler process; `await run()` serves until cancelled."""

    def __init__(self, settings: Settings, context: zmq.asyncio.Context | None = None):
        self.settings = settings
        self.ctx = context or zmq.asyncio.Context.instance()
        self.frontend = self._router()
        self.backend = self._router()
        self.index = PrefixIndex(settings.redis_url, on_reconnect=self._resync_all)
        self.workers: dict[str, WorkerState] = {}
        self.by_identity: dict[bytes, str] = {}
        self.requests: dict[str, Pending] = {}
        self.queue: deque[Pending] = deque()
        self.formatters: dict[bytes, float] = {}  # formatters that ping -> last heard
        self._resync_sent: dict[bytes, float] = {}
        self._index_updates: asyncio.Queue = asyncio.Queue()
        self._queue_moved = asyncio.Event()
        self._relayed: dict[bytes, list[bytes]] | None = None  # formatter -> frames, while a worker batch is read
        self.draining = False  # SIGTERM'd: new requests get 503, admitted ones run to their end
        self.tracer = tracer("rose.scheduler")

    def _router(self) -> zmq.asyncio.Socket:
        sock = self.ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, HWM)
        sock.setsockopt(zmq.RCVHWM, HWM)
        secure_server(sock, self.settings)  # CURVE when configured (before bind)
        return sock

    # ------------------------------------------------------------ lifecycle
    async def run(self) -> None:
        self.frontend.bind(self.settings.scheduler_frontend)
        self.backend.bind(self.settings.scheduler_backend)
        log.info("scheduler: formatters at %s, workers at %s", self.settings.scheduler_frontend, self.settings.scheduler_backend)
        tasks = [
            asyncio.create_task(self._frontend_loop(), name="frontend"),
            asyncio.create_task(self._backend_loop(), name="backend"),
            asyncio.create_task(self._dispatch_loop(), name="dispatch"),
            asyncio.create_task(self._index_writer(), name="index-writer"),
            asyncio.create_task(self._liveness_loop(), name="liveness"),
            asyncio.create_task(self._sweep_loop(), name="sweep"),
        ]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                task.result()  # a loop that died is a bug: surface it
        finally:
            await _cancel_all(tasks)
            self.close()
            await self.index.close()

    def close(self) -> None:
        self.frontend.close(0)
        self.backend.close(0)

    # ------------------------------------------------------------ formatters
    async def _frontend_loop(self) -> None:
        while True:
            for parts in [await self.frontend.recv_multipart(), *queued(self.frontend)]:
                await self._on_frontend_message(parts)

    async def _on_frontend_message(self, parts: list[bytes]) -> None:
        if len(parts) != 2:
            log.warning("frontend: dropped a message of %d parts (expected identity + frame)", len(parts))
            return
        identity, frame = parts
        try:
            msg = protocol.decode(frame)
        except FrameError as exc:
            log.warning("frontend: dropped a bad frame: %s", exc)
            return
        if identity in self.formatters:
            self.formatters[identity] = time.monotonic()
        try:
            if isinstance(msg, Submit):
                await self._on_submit(identity, msg)
            elif isinstance(msg, Abort):
                self._on_abort(identity, msg)
            elif isinstance(msg, Ping):
                self.formatters[identity] = time.monotonic()
                self._send_nowait(self.frontend, identity, self.pong(msg.sent_at))
            else:
                log.warning("frontend: dropped an unexpected %s", type(msg).__name__)
        except Exception:  # one bad request must not stop the loop that serves all
            log.exception("frontend: handling %s failed", type(msg).__name__)

    def pong(self, sent_at: float) -> Pong:
        models = sorted({w.model for w in self.workers.values()})
        longest = max((w.max_model_len for w in self.workers.values()), default=0)
        return Pong(sent_at=sent_at, ready=bool(self.workers) and not self.draining, models=models, workers=len(self.workers), max_model_len=longest)

    async def _on_submit(self, identity: bytes, msg: Submit) -> None:
        span = self.tracer.start_span(
            "scheduler.request",
            context=extract(msg.trace),
            kind=SpanKind.INTERNAL,
            attributes={"rose.request_id": msg.request_id, "rose.prompt_tokens": len(msg.token_ids)},
        )
        if self.draining:
            self._send_nowait(self.frontend, identity, _error_event(msg.request_id, "the scheduler is shutting down; retry", 503))
            span.end()
            return
        if not msg.request_id or msg.request_id in self.requests:
            reason = "request_id is empty" if not msg.request_id else f"request_id {msg.request_id!r} is already running"
            self._send_nowait(self.frontend, identity, _error_event(msg.request_id, reason, 400))
            span.set_status(Status(StatusCode.ERROR, reason))
            span.end()
            return
        pending = Pending(msg, identity, span)
        self.requests[msg.request_id] = pending
        if not msg.token_ids:
            self._fail(pending, "the prompt has no tokens", 400)
            return
        if self.queue:  # others wait already: first come, first served
            self._enqueue_or_reject(pending)
            return
        await self._route(pending, from_queue=False)

    def _on_abort(self, identity: bytes, msg: Abort) -> None:
        pending = self.requests.get(msg.request_id)
        if pending is None or pending.formatter != identity:
            return
        self._abort(pending, msg.reason)

    def _abort(self, pending: Pending, reason: str) -> None:
        if pending.worker_id is None:
            # still queued: nothing runs anywhere, end it here
            try:
                self.queue.remove(pending)
            except ValueError:
                pass
            self._finish(pending, TokenEvent(pending.request_id, finish_reason="abort"))
            return
        pending.aborted = True
        worker = self.workers.get(pending.worker_id)
        if worker is not None:
            self._send_nowait(self.backend, worker.identity, Abort(pending.request_id, reason))

    # ------------------------------------------------------------ admission and routing
    async def _route(self, pending: Pending, from_queue: bool) -> bool:
        """Place one request on a worker; False when it must (still) wait.

        Ends the request with 503 (no worker) or 400 (prompt longer than every
        worker's context); queues it or ends it with 429 when every worker is full.
        """
        if not self.workers:
            self._fail(pending, "no model worker is available", 503)
            return True
        prompt_len = len(pending.submit.token_ids)
        fitting = [w for w in self.workers.values() if not w.max_model_len or prompt_len < w.max_model_len]
        if not fitting:
            longest = max(w.max_model_len for w in self.workers.values())
            self._fail(pending, f"the prompt has {prompt_len} tokens; the model's context is {longest}", 400)
            return True
        with_room = [w for w in fitting if w.has_room()]
        if not with_room:
            if not from_queue:
                self._enqueue_or_reject(pending)
            return False
        hits = await self._prefix_hits(pending.submit.token_ids, with_room)
        if self.requests.get(pending.request_id) is not pending:
            return True  # aborted or failed while Redis answered
        # workers may have died or filled while Redis answered
        worker = choose_worker([w for w in with_room if w.worker_id in self.workers], prompt_len, hits)
        if worker is None:
            if not from_queue:
                self._enqueue_or_reject(pending)
            return False
        self._assign(pending, worker, hits.get(worker.worker_id, 0))
        return True

    async def _prefix_hits(self, token_ids: list[int], workers: list[WorkerState]) -> dict[str, int]:
        """Worker id -> leading blocks of the prompt in its cache, per the Redis index."""
        hits: dict[str, int] = {}
        for block_size in {w.block_size for w in workers}:
            hashes = prefix_hashes(token_ids, block_size)
            if hashes:
                found = await self.index.longest_prefix(hashes)
                hits.update({w.worker_id: found.get(w.worker_id, 0) for w in workers if w.block_size == block_size})
        return hits

    def _enqueue_or_reject(self, pending: Pending) -> None:
        if len(self.queue) >= self.settings.max_queue:
            self._fail(pending, f"every worker is busy and {len(self.queue)} requests are queued; retry later", 429)
            return
        pending.queued_at = time.monotonic()
        self.queue.append(pending)
        self._queue_moved.set()

    def _assign(self, pending: Pending, worker: WorkerState, hit_blocks: int) -> None:
        pending.worker_id = worker.worker_id
        worker.add(pending.request_id, worker.request_load(len(pending.submit.token_ids)))
        pending.span.set_attribute("rose.worker_id", worker.worker_id)
        pending.span.set_attribute("rose.prefix_hit_blocks", hit_blocks)
        pending.span.add_event("dispatched")  # after the queue and the index lookup
        with trace.use_span(pending.span, end_on_exit=False):
            carrier = inject({})
        submit = pending.submit
        self._send_nowait(self.backend, worker.identity, Submit(submit.request_id, submit.token_ids, submit.params, carrier))

    async def _dispatch_loop(self) -> None:
        """Move queued requests onto workers as room frees up."""
        while True:
            await self._queue_moved.wait()
            self._queue_moved.clear()
            while self.queue:
                pending = self.queue[0]
                if not await self._route(pending, from_queue=True):
                    break  # every worker is full: wait for a request to finish
                if self.queue and self.queue[0] is pending:
                    self.queue.popleft()

    # ------------------------------------------------------------ workers
    async def _backend_loop(self) -> None:
        """Worker messages; a message may carry several frames (a worker batches one step's events)."""
        while True:
            batch = [await self.backend.recv_multipart()]
            batch += queued(self.backend)
            self._relayed = {}
            try:
                for parts in batch:
                    if len(parts) < 2:
                        log.warning("backend: dropped a message without a frame")
                        continue
                    for frame in parts[1:]:
                        self._on_backend_frame(parts[0], frame)
            finally:
                relayed, self._relayed = self._relayed, None
                for formatter, frames in relayed.items():
                    self._send_frames(self.frontend, formatter, frames)

    def _on_backend_frame(self, identity: bytes, frame: bytes) -> None:
        worker = self.workers.get(self.by_identity.get(identity, ""))
        if worker is not None:
            worker.last_seen = time.monotonic()
        streaming = peek_streaming_token_event(frame)
        if streaming is not None:  # the hot path: relay without a full decode
            self._on_token_event(identity, worker, streaming[0], bool(streaming[1]), None, frame)
            return
        try:
            msg = protocol.decode(frame)
        except FrameError as exc:
            log.warning("backend: dropped a bad frame: %s", exc)
            return
        try:
            if isinstance(msg, TokenEvent):
                self._on_token_event(identity, worker, msg.request_id, bool(msg.token_ids), msg, frame)
            elif isinstance(msg, Heartbeat):
                self._on_heartbeat(identity, worker, msg)
            elif isinstance(msg, KvEvent):
                if worker is not None and msg.worker_id == worker.worker_id:
                    self._index_updates.put_nowait(msg)
            elif isinstance(msg, Register):
                self._on_register(identity, msg)
            else:
                log.warning("backend: dropped an unexpected %s", type(msg).__name__)
        except Exception:
            log.exception("backend: handling %s failed", type(msg).__name__)

    def _on_register(self, identity: bytes, msg: Register) -> None:
        if msg.block_size < 1 or msg.max_num_seqs < 1:
            log.warning("backend: dropped Register from %s: block_size and max_num_seqs must be >= 1", msg.worker_id)
            return
        old = self.workers.get(msg.worker_id)
        if old is not None and old.identity != identity:
            # a new process under the same name: the old one's requests are lost
            self._worker_gone(old, "it registered again (restarted)")
            old = None
        if old is None:
            self.by_identity.pop(identity, None)
            worker = WorkerState(msg.worker_id, identity, msg.model, msg.block_size, msg.max_model_len, msg.max_num_seqs, msg.total_blocks)
            self.workers[msg.worker_id] = worker
            self.by_identity[identity] = msg.worker_id
            log.info("worker %s registered: model %s, %d seqs, %d blocks of %d", msg.worker_id, msg.model, msg.max_num_seqs, msg.total_blocks, msg.block_size)
        else:  # the answer to a Resync: same process, its requests still run
            old.model, old.block_size, old.max_model_len = msg.model, msg.block_size, msg.max_model_len
            old.max_num_seqs, old.total_blocks = msg.max_num_seqs, msg.total_blocks
        self._queue_moved.set()

    def _on_heartbeat(self, identity: bytes, worker: WorkerState | None, msg: Heartbeat) -> None:
        if worker is None or worker.worker_id != msg.worker_id:
            # we do not know it (we restarted, or it was timed out): ask it to register again
            now = time.monotonic()
            if now - self._resync_sent.get(identity, 0.0) > self.settings.heartbeat_timeout / 2:
                self._resync_sent[identity] = now
                self._send_nowait(self.backend, identity, Resync("unknown worker"))
            return
        worker.running, worker.waiting, worker.free_blocks = msg.running, msg.waiting, msg.free_blocks
        worker.prefill_tokens, worker.cached_tokens, worker.finished = msg.prefill_tokens, msg.cached_tokens, msg.finished
        if msg.draining and not worker.draining:
            log.info("worker %s is draining; no new requests go there", worker.worker_id)
        worker.draining = msg.draining
        stats = {
            "model": worker.model,
            "running": msg.running,
            "waiting": msg.waiting,
            "free_blocks": msg.free_blocks,
            "total_blocks": msg.total_blocks,
            "prefill_tokens": msg.prefill_tokens,
            "cached_tokens": msg.cached_tokens,
            "finished": msg.finished,
            "aborted": msg.aborted,
            "draining": int(msg.draining),
            "inflight": len(worker.inflight),
            "block_size": worker.block_size,
        }
        self._index_updates.put_nowait(("stats", worker.worker_id, stats))

    def _on_token_event(self, identity: bytes, worker: WorkerState | None, request_id: str, has_tokens: bool,
                        last: TokenEvent | None, frame: bytes) -> None:
        """Relay one event; `last` is the decoded event when it ends the request, else None."""
        pending = self.requests.get(request_id)
        if worker is None or pending is None or pending.worker_id != worker.worker_id:
            # an orphan (we restarted, or it was re-run elsewhere): stop it there
            if last is None:
                self._send_nowait(self.backend, identity, Abort(request_id, "unknown request"))
            return
        if has_tokens:
            pending.streamed = True
        if last is None or last.finish_reason is None:
            self._to_formatter(pending.formatter, frame)
        else:
            self._finish(pending, last, frame)

    def _worker_gone(self, worker: WorkerState, why: str) -> None:
        """Take a worker out of routing and the index; end or re-run its requests."""
        log.warning("worker %s is out: %s; %d requests in flight", worker.worker_id, why, len(worker.inflight))
        self.workers.pop(worker.worker_id, None)
        if self.by_identity.get(worker.identity) == worker.worker_id:
            del self.by_identity[worker.identity]
        self._index_updates.put_nowait(KvEvent(worker.worker_id, cleared=True))
        rerun = []
        for request_id in list(worker.inflight):
            pending = self.requests.get(request_id)
            if pending is None:
                continue
            # in case it is only slow, not dead: it must not go on computing for nobody
            self._send_nowait(self.backend, worker.identity, Abort(request_id, "re-routed"))
            if pending.aborted:
                self._finish(pending, TokenEvent(request_id, finish_reason="abort"))
            elif not pending.streamed and pending.reruns < MAX_RERUNS:
                pending.reruns += 1
                pending.worker_id = None
                pending.span.add_event("rerun", {"rose.dead_worker": worker.worker_id})
                rerun.append(pending)
            else:
                self._finish(pending, _error_event(request_id, f"worker {worker.worker_id} failed mid-request ({why})", 503))
        worker.inflight.clear()
        self.queue.extendleft(reversed(rerun))
        self._queue_moved.set()

    def _finish(self, pending: Pending, event: TokenEvent, frame: bytes | None = None) -> None:
        """Send the request's last event to its formatter and forget the request."""
        self._to_formatter(pending.formatter, frame if frame is not None else protocol.encode(event))
        self.requests.pop(pending.request_id, None)
        worker = self.workers.get(pending.worker_id or "")
        if worker is not None:
            worker.remove(pending.request_id)
            self._queue_moved.set()
        span = pending.span
        span.set_attribute("rose.finish_reason", event.finish_reason or "")
        if event.error:
            span.set_status(Status(StatusCode.ERROR, event.error))
            span.set_attribute("rose.status", event.status)
        span.end()

    def _fail(self, pending: Pending, reason: str, status: int) -> None:
        if pending in self.queue:
            self.queue.remove(pending)
        self._finish(pending, _error_event(pending.request_id, reason, status))

    def _to_formatter(self, formatter: bytes, frame: bytes) -> None:
        """A TokenEvent frame for a formatter: held while a batch of worker messages is read,
        then sent as one message per formatter (in order), else sent now."""
        if self._relayed is None:
            self._send_frames(self.frontend, formatter, [frame])
        else:
            self._relayed.setdefault(formatter, []).append(frame)

    def _send_nowait(self, sock: zmq.asyncio.Socket, identity: bytes, message) -> None:
        """Send without waiting; the high-water mark is far above any burst, so a full pipe is logged and dropped."""
        self._send_frames(sock, identity, [message if isinstance(message, bytes) else protocol.encode(message)])

    def _send_frames(self, sock: zmq.asyncio.Socket, identity: bytes, frames: list[bytes]) -> None:
        sent = sock.send_multipart([identity, *frames], flags=zmq.DONTWAIT)
        if sent.done() and sent.exception() is not None:
            log.warning("could not send %d frames to %r: %s", len(frames), identity, sent.exception())

    # ------------------------------------------------------------ background loops
    async def _index_writer(self) -> None:
        """Apply KvEvents and heartbeat counters to Redis in arrival order, off the relay path."""
        while True:
            item = await self._index_updates.get()
            try:
                if isinstance(item, KvEvent):
                    await self.index.apply(item.worker_id, item.stored, item.removed, item.cleared)
                else:
                    _, worker_id, stats = item
                    await self.index.publish_stats(worker_id, stats, ttl_s=2 * self.settings.heartbeat_timeout)
            except Exception:
                log.exception("index update failed")

    async def _liveness_loop(self) -> None:
        """Drop silent workers; abort the requests of formatters that stopped pinging."""
        period = max(0.02, min(self.settings.heartbeat_interval, self.settings.heartbeat_timeout / 4))
        while True:
            await asyncio.sleep(period)
            now = time.monotonic()
            for worker in list(self.workers.values()):
                if now - worker.last_seen > self.settings.heartbeat_timeout:
                    self._worker_gone(worker, f"no heartbeat for {now - worker.last_seen:.1f}s")
            for identity, last in list(self.formatters.items()):
                if now - last > self.settings.heartbeat_timeout:
                    del self.formatters[identity]
                    orphans = [p for p in self.requests.values() if p.formatter == identity]
                    if orphans:
                        log.warning("formatter %r went silent; aborting its %d requests", identity, len(orphans))
                    for pending in orphans:
                        self._abort(pending, "formatter gone")
            if not self.workers and self.queue:
                for pending in list(self.queue):
                    self._fail(pending, "no model worker is available", 503)

    async def _sweep_loop(self) -> None:
        """Clear index entries of workers no scheduler heard from (a crashed replica's)."""
        while True:
            await asyncio.sleep(max(1.0, self.settings.heartbeat_timeout))
            cleared = await self.index.sweep_stale(set(self.workers))
            if cleared:
                log.info("cleared the prefix index of stale workers %s", cleared)

    async def _resync_all(self) -> None:
        """Redis came back, maybe empty: every worker resends its whole cache."""
        for worker in self.workers.values():
            self._send_nowait(self.backend, worker.identity, Resync("redis reconnected"))


def _error_event(request_id: str, message: str, status: int) -> TokenEvent:
    return TokenEvent(request_id, finish_reason="error", error=message, status=status)


def peek_streaming_token_event(frame: bytes) -> tuple[str, list] | None:
    """(request_id, token_ids) of a TokenEvent that does not end its request, else None.

    Mid-stream events are most of the traffic and are relayed byte for byte, so the
    scheduler reads only the fields it acts on (a full decode costs ~10x more); the
    formatter decodes them in full. Anything else, finishing events included, goes
    through protocol.decode.
    """
    try:
        obj = msgpack.unpackb(frame, raw=False)
    except Exception:
        return None
    if type(obj) is not list or len(obj) != 3 or obj[0] != protocol.PROTOCOL_VERSION or obj[1] != "TokenEvent":
        return None
    payload = obj[2]
    if type(payload) is not dict or payload.get("finish_reason") is not None:
        return None
    request_id, tokens = payload.get("request_id"), payload.get("token_ids", [])
    if type(request_id) is not str or type(tokens) is not list:
        return None
    return request_id, tokens


async def _cancel_all(tasks: list[asyncio.Task]) -> None:
    """Cancel tasks and wait for them; cancel again any that swallowed it (redis-py can)."""
    pending = set(tasks)
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=0.5)

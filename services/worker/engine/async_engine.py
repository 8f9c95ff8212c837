"""The engine for asyncio callers: the step loop in a background thread, a stream per request.

The worker's asyncio loop handles ZeroMQ while this thread runs forward passes
(torch releases the GIL inside its kernels). Only the loop thread touches the
Engine; callers hand it new requests and aborts through a condition variable,
and it sleeps on that condition when there is nothing to do, so an idle worker
costs no CPU. Outputs reach each request's asyncio.Queue through
`loop.call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from services.worker.engine.engine import Engine, EngineStats
from services.worker.engine.errors import EngineInputError
from services.worker.engine.sequence import RequestOutput
from shared.protocol import SamplingParams

log = logging.getLogger(__name__)


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue


class EngineShutDown(RuntimeError):
    """generate() after shutdown()."""


class AsyncEngine:
    def __init__(self, engine: Engine):
        self.engine = engine
        self._cond = threading.Condition()
        # ("add", id, tokens, params, arrived) / ("abort", id), applied in the order they came
        self._commands: list[tuple] = []
        self._streams: dict[str, _Stream] = {}
        self._stopping = False
        self._stats = engine.stats()
        self._kv_events: dict[int, bool] = {}  # hash -> stored; netted as in BlockPool
        self._thread = threading.Thread(target=self._run, name="rose-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ caller side
    async def generate(
        self, request_id: str, token_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[RequestOutput]:
        """Outputs of one request until it finishes; EngineInputError before any output for bad input.

        Leaving the iteration early (break, cancellation, error) aborts the request.
        """
        with self._cond:
            if self._stopping:
                raise EngineShutDown("the engine is shut down")
            if request_id in self._streams:
                raise EngineInputError(f"request {request_id!r} is already running")
            # Checked here so the caller gets the error now; the engine reads only fixed limits.
            self.engine.check_request(request_id, token_ids, params)
            stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
            self._streams[request_id] = stream
            # arrival is now: the wait for the engine thread's current step counts as queueing
            self._commands.append(("add", request_id, list(token_ids), params, time.monotonic()))
            self._cond.notify()
        finished = False
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, Exception):
                    finished = True  # the engine never took the request
                    raise item
                if item.finished:
                    finished = True
                yield item
                if finished:
                    return
        finally:
            with self._cond:
                if self._streams.get(request_id) is stream:
                    del self._streams[request_id]
                if not finished and not self._stopping:
                    self._commands.append(("abort", request_id))
                    self._cond.notify()

    def abort(self, request_id: str) -> None:
        """Stop a request; its stream ends with finish_reason "abort". Unknown ids are ignored."""
        with self._cond:
            self._commands.append(("abort", request_id))
            self._cond.notify()

    def stats(self) -> EngineStats:
        """The counters as of the end of the last step."""
        with self._cond:
            return self._stats

    def drain_kv_events(self) -> tuple[list[int], list[int]]:
        """Net (stored, removed) prefix-block hashes since the last call (a hash in one list at most)."""
        with self._cond:
            events, self._kv_events = self._kv_events, {}
        return [h for h, kept in events.items() if kept], [h for h, kept in events.items() if not kept]

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop the loop thread after its current step; open streams end with "abort"."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    # ------------------------------------------------------------------ loop thread
    def _run(self) -> None:
        engine = self.engine
        while True:
            with self._cond:
                while not (self._stopping or self._commands or engine.has_work()):
                    self._cond.wait()
                if self._stopping:
                    break
                commands, self._commands = self._commands, []
            for command in commands:
                self._apply(command)
            try:
                outputs = engine.step()
            except Exception as exc:  # a bug in the step: fail what is running, keep serving
                log.exception("engine step failed")
                outputs = self._fail_all(f"engine step failed: {exc}")
            stored, removed = engine.drain_kv_events()
            with self._cond:
                self._stats = engine.stats()
                for h, kept in [(h, False) for h in removed] + [(h, True) for h in stored]:
                    self._kv_events.pop(h, None)
                    self._kv_events[h] = kept
            self._deliver_step(outputs)
        self._close_streams()

    def _apply(self, command: tuple) -> None:
        """One add or abort; an add the engine refuses raises in that request's stream."""
        try:
            if command[0] == "add":
                self.engine.add_request(*command[1:])
            else:
                self.engine.abort(command[1])
        except Exception as exc:  # EngineInputError, or a bug: it must not end the loop
            self._deliver(command[1], exc)

    def _fail_all(self, message: str) -> list[RequestOutput]:
        """End every request with an error after an unexpected failure of the step."""
        ids = list(self.engine.requests)
        for request_id in ids:
            self.engine.abort(request_id)
        try:
            self.engine.step()  # flush the abort outputs; nothing is left to run
        except Exception:
            log.exception("engine step failed while failing every request")
        return [RequestOutput(request_id=i, finish_reason="error", error=message) for i in ids]

    def _deliver_step(self, outputs: list[RequestOutput]) -> None:
        """A step's outputs: one wake-up per event loop, not one per request (64 at 64 streams)."""
        puts: dict[asyncio.AbstractEventLoop, list] = {}
        with self._cond:
            for out in outputs:
                stream = self._streams.get(out.request_id)
                if stream is not None:  # else the consumer left; its abort is queued or done
                    puts.setdefault(stream.loop, []).append((stream.queue, out))
        for loop, items in puts.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # that loop is closed
                pass

    def _deliver(self, request_id: str, item: RequestOutput | Exception) -> None:
        with self._cond:
            stream = self._streams.get(request_id)
        if stream is None:
            return  # the consumer left; its abort is queued or done
        try:
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, item)
        except RuntimeError:  # the consumer's event loop is closed
            pass

    def _close_streams(self) -> None:
        for request_id in list(self.engine.requests):
            self.engine.abort(request_id)
        with self._cond:
            streams, self._streams = dict(self._streams), {}
        for request_id, stream in streams.items():
            out = RequestOutput(request_id=request_id, finish_reason="abort", error="the engine shut down")
            try:
                stream.loop.call_soon_threadsafe(stream.queue.put_nowait, out)
            except RuntimeError:
                pass
        try:
            self.engine.step()  # release the aborted requests' state
        except Exception:
            log.exception("final engine step failed")
        with self._cond:
            self._stats = self.engine.stats()


def _put_all(items: list[tuple[asyncio.Queue, RequestOutput]]) -> None:
    for queue, item in items:
        queue.put_nowait(item)

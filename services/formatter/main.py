"""The formatter service: gateways' requests in, Harmony tokens down, parsed deltas back.

Sockets: a ROUTER bound at `formatter_bind` for gateways (GenerateRequest, Abort,
Ping in; Delta, Pong out) and a DEALER to the scheduler's frontend (Submit, Abort,
Ping out; TokenEvent, Pong in). One thread polls both; rendering and parsing are
quick next to a forward pass. The only state is the requests in flight, so any
number of replicas can run side by side.

SIGTERM drains: new requests are refused (503) and Pongs say not ready, so gateways
send work elsewhere; the requests in flight run to their end for up to
`drain_timeout` seconds, then the rest fail with a 503 and the process exits 0.
A second signal stops at once.
"""

from __future__ import annotations

import logging
import signal
import time
from dataclasses import dataclass

import zmq
from zmq.utils.monitor import parse_monitor_message

from shared import telemetry
from shared.protocol import Abort, Delta, FrameError, GenerateRequest, Ping, Pong, TokenEvent, decode, encode
from shared.vocab import VocabError, load_harmony_encoding
from shared.zmq_security import secure_client, secure_server

from .render import RenderError
from .request import InFlightRequest, split_sub_request_id

log = logging.getLogger("rose.formatter")

# A ROUTER drops (or, mandatory, refuses) frames past its high-water mark; token
# events come in bursts, so leave plenty of room.
HWM = 100_000


@dataclass
class Tracked:
    peer: bytes  # the gateway's ROUTER identity
    request: InFlightRequest
    span: object


class FormatterService:
    def __init__(self, settings, context: zmq.Context | None = None):
        self.settings = settings
        self.encoding = load_harmony_encoding(settings.vocab_dir)
        self.context = context or zmq.Context.instance()
        self.frontend = self.context.socket(zmq.ROUTER)
        self.frontend.setsockopt(zmq.LINGER, 0)
        self.frontend.setsockopt(zmq.SNDHWM, HWM)
        self.frontend.setsockopt(zmq.RCVHWM, HWM)
        self.frontend.setsockopt(zmq.ROUTER_MANDATORY, 1)  # an unroutable reply raises, not vanishes
        secure_server(self.frontend, settings)
        self.frontend.bind(settings.formatter_bind)
        self.scheduler = self.context.socket(zmq.DEALER)
        self.scheduler.setsockopt(zmq.LINGER, 0)
        self.scheduler.setsockopt(zmq.SNDHWM, HWM)
        self.scheduler.setsockopt(zmq.RCVHWM, HWM)
        secure_client(self.scheduler, settings)
        self.scheduler.connect(settings.scheduler_frontend)
        self.inflight: dict[str, Tracked] = {}
        self._outbox: dict[bytes, list[tuple[str, bytes]]] = {}  # gateway -> (request id, Delta frame) to send
        self.scheduler_pong = Pong()
        self.scheduler_heard_at = 0.0
        self._next_ping = 0.0
        self._running = True
        self.draining = False
        self._drain_deadline = 0.0
        self._tracer = telemetry.tracer("rose.formatter")

    # ------------------------------------------------------------------ loop
    def stop(self, *_):
        """Stop at once (the requests in flight end with a 503 error)."""
        self._running = False

    def drain(self, *_):
        """Refuse new work; stop once the requests in flight end or drain_timeout passes."""
        if self.draining:
            self.stop()
            return
        self.draining = True
        self._drain_deadline = time.monotonic() + self.settings.drain_timeout
        log.info("draining: %d requests in flight, up to %.0fs", len(self.inflight), self.settings.drain_timeout)

    @property
    def drained(self) -> bool:
        return self.draining and (not self.inflight or time.monotonic() > self._drain_deadline)

    def run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.frontend, zmq.POLLIN)
        poller.register(self.scheduler, zmq.POLLIN)
        # A dropped scheduler connection (it died or restarted) loses every request on
        # it; fail them now rather than after heartbeat_timeout.
        monitor = self.scheduler.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        poller.register(monitor, zmq.POLLIN)
        log.info("formatter on %s, scheduler %s", self.settings.formatter_bind, self.settings.scheduler_frontend)
        try:
            while self._running and not self.drained:
                self._heartbeat()
                timeout_ms = max(1, int((self._next_ping - time.monotonic()) * 1000))
                for sock, _ in poller.poll(min(timeout_ms, 200)):
                    if sock is self.frontend:
                        self._drain(self.frontend, self._on_gateway_frames)
                    elif sock is self.scheduler:
                        self._drain(self.scheduler, self._on_scheduler_frames)
                        self._flush_deltas()
                    else:
                        self._drain(monitor, self._on_scheduler_connection)
        finally:
            self.scheduler.disable_monitor()
            monitor.close(0)
            self.close()

    def _on_scheduler_connection(self, frames: list[bytes]) -> None:
        if parse_monitor_message(frames)["event"] != zmq.EVENT_DISCONNECTED:
            return
        # What the gone scheduler last said (ready, its workers) no longer holds: the formatter reports not
        # ready, and takes no request, until a scheduler answers again (a restarted one may not yet have
        # its workers back).
        self.scheduler_pong, self.scheduler_heard_at = Pong(), 0.0
        if self.inflight:
            log.warning("scheduler connection dropped; failing %d requests", len(self.inflight))
            for request_id in list(self.inflight):
                self._fail(request_id, "the connection to the scheduler dropped", 503)

    def close(self) -> None:
        for request_id in list(self.inflight):
            self._fail(request_id, "the formatter is shutting down", 503)
        self._flush_deltas()
        self.frontend.close(0)
        self.scheduler.close(0)

    @staticmethod
    def _drain(sock, handler, limit: int = 256) -> None:
        """Handle what is queued on a socket (bounded, so neither side starves)."""
        for _ in range(limit):
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            handler(frames)

    @property
    def scheduler_live(self) -> bool:
        return time.monotonic() - self.scheduler_heard_at < self.settings.heartbeat_timeout

    def _heartbeat(self) -> None:
        now = time.monotonic()
        if now < self._next_ping:
            return
        self._next_ping = now + self.settings.heartbeat_interval
        self._send_down(Ping(sent_at=time.time()))
        if self.inflight and not self.scheduler_live:
            for request_id in list(self.inflight):
                self._fail(request_id, "the scheduler is not answering", 503)

    # ------------------------------------------------------------------ gateway side
    def _on_gateway_frames(self, frames: list[bytes]) -> None:
        if len(frames) != 2:
            log.warning("dropping a gateway message of %d frames", len(frames))
            return
        peer, frame = frames
        try:
            message = decode(frame)
        except FrameError as exc:
            log.warning("dropping a bad frame from a gateway: %s", exc)
            return
        if isinstance(message, GenerateRequest):
            self._on_generate(peer, message)
        elif isinstance(message, Abort):
            self._abort_request(message.request_id, message.reason)
        elif isinstance(message, Ping):
            live = self.scheduler_live
            pong = Pong(
                sent_at=message.sent_at,
                ready=live and self.scheduler_pong.ready and not self.draining,
                models=list(self.scheduler_pong.models) if live else [],
                workers=self.scheduler_pong.workers if live else 0,
                max_model_len=self.scheduler_pong.max_model_len if live else 0,
            )
            self._send_up(peer, pong)
        else:
            log.warning("unexpected %s from a gateway", type(message).__name__)

    def _on_generate(self, peer: bytes, message: GenerateRequest) -> None:
        if message.request_id in self.inflight:
            self._send_up(peer, Delta(message.request_id, error="duplicate request id", status=400, finish_reason="error"))
            return
        if self.draining:
            self._send_up(peer, Delta(message.request_id, error="the formatter is shutting down; retry", status=503, finish_reason="error"))
            return
        span = self._tracer.start_span(
            "formatter.request",
            context=telemetry.extract(message.trace),
            attributes={"rose.request_id": message.request_id, "rose.endpoint": message.endpoint},
        )
        try:
            with telemetry.use_span(span):
                carrier = telemetry.inject({})
            request, submits = InFlightRequest.start(message, self.encoding, carrier, self.scheduler_pong.max_model_len)
        except RenderError as exc:
            span.set_attribute("rose.error", str(exc))
            span.end()
            self._send_up(peer, Delta(message.request_id, error=str(exc), status=400, finish_reason="error"))
            return
        except Exception as exc:  # a bug or an unforeseen body must not take the service down
            log.exception("rendering request %s failed", message.request_id)
            span.end()
            self._send_up(peer, Delta(message.request_id, error=f"cannot render the request: {exc}", status=500, finish_reason="error"))
            return
        span.set_attribute("rose.prompt_tokens", request.prompt_tokens)
        if not self.scheduler_live:
            span.end()
            self._send_up(peer, Delta(message.request_id, error="no scheduler is reachable", status=503, finish_reason="error"))
            return
        self.inflight[message.request_id] = Tracked(peer, request, span)
        for submit in submits:
            if not self._send_down(submit):
                self._fail(message.request_id, "the scheduler is not accepting requests", 503)
                return

    def _abort_request(self, request_id: str, reason: str) -> None:
        tracked = self.inflight.pop(request_id, None)
        if tracked is None:
            return
        for abort in tracked.request.unfinished_aborts(reason):
            self._send_down(abort)
        tracked.span.set_attribute("rose.aborted", reason)
        tracked.span.end()

    def _fail(self, request_id: str, error: str, status: int) -> None:
        tracked = self.inflight.pop(request_id, None)
        if tracked is None:
            return
        delta, aborts = tracked.request.fail(error, status)
        for abort in aborts:
            self._send_down(abort)
        self._send_up(tracked.peer, delta)
        tracked.span.set_attribute("rose.error", error)
        tracked.span.end()

    # ------------------------------------------------------------------ scheduler side
    def _on_scheduler_frames(self, frames: list[bytes]) -> None:
        """One scheduler message: one frame, or several (the token events it relayed together)."""
        for frame in frames:
            self._on_scheduler_frame(frame)

    def _on_scheduler_frame(self, frame: bytes) -> None:
        try:
            message = decode(frame)
        except FrameError as exc:
            log.warning("dropping a bad frame from the scheduler: %s", exc)
            return
        self.scheduler_heard_at = time.monotonic()
        if isinstance(message, Pong):
            self.scheduler_pong = message
        elif isinstance(message, TokenEvent):
            self._on_token_event(message)
        else:
            log.warning("unexpected %s from the scheduler", type(message).__name__)

    def _on_token_event(self, event: TokenEvent) -> None:
        parsed = split_sub_request_id(event.request_id)
        tracked = self.inflight.get(parsed[0]) if parsed else None
        if tracked is None:
            return  # a request already finished or aborted
        try:
            deltas, aborts = tracked.request.on_event(parsed[1], event, self.encoding)
        except Exception as exc:  # never let one request's parse bug end the service
            log.exception("parsing tokens of %s failed", event.request_id)
            self._fail(parsed[0], f"cannot parse the model output: {exc}", 500)
            return
        for abort in aborts:
            self._send_down(abort)
        if deltas:
            self._outbox.setdefault(tracked.peer, []).extend((parsed[0], encode(d)) for d in deltas)
        if tracked.request.done:
            del self.inflight[parsed[0]]
            tracked.span.set_attribute(
                "rose.completion_tokens", sum(c.completion_tokens for c in tracked.request.choices)
            )
            tracked.span.end()

    # ------------------------------------------------------------------ sending
    def _flush_deltas(self) -> None:
        """Send each gateway the Deltas made since the last flush, as one message of one frame each.

        A worker step's events arrive together; one ZeroMQ message per gateway instead of
        one per Delta is most of what this hop costs at 64 streams.
        """
        outbox, self._outbox = self._outbox, {}
        for peer, items in outbox.items():
            try:
                self.frontend.send_multipart([peer, *(frame for _, frame in items)], zmq.NOBLOCK)
            except zmq.ZMQError as exc:  # the gateway went away or is not reading
                log.warning("cannot reach gateway %r: %s", peer, exc)
                # stop generating for nobody
                for request_id in dict.fromkeys(request_id for request_id, _ in items):
                    self._abort_request(request_id, "gateway gone")

    def _send_up(self, peer: bytes, message) -> bool:
        if peer in self._outbox:  # behind Deltas not sent yet: keep the order
            self._outbox[peer].append((getattr(message, "request_id", ""), encode(message)))
            return True
        try:
            self.frontend.send_multipart([peer, encode(message)], zmq.NOBLOCK)
            return True
        except zmq.ZMQError as exc:  # the gateway went away or is not reading
            log.warning("cannot reach gateway %r: %s", peer, exc)
            return False

    def _send_down(self, message) -> bool:
        try:
            self.scheduler.send(encode(message), zmq.NOBLOCK)
            return True
        except zmq.ZMQError as exc:  # Again: the scheduler's queue is full or not connected
            log.warning("cannot send to the scheduler: %s", exc)
            return False


def main(settings, args=None) -> int:
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    try:
        telemetry.setup_tracing("formatter", settings)
        service = FormatterService(settings)
    except (ValueError, zmq.ZMQError, VocabError) as exc:  # bad settings: say so, no traceback
        log.error("cannot start the formatter: %s", exc)
        return 2
    signal.signal(signal.SIGTERM, service.drain)
    signal.signal(signal.SIGINT, service.drain)
    try:
        service.run()
    finally:
        telemetry.shutdown_tracing()
    return 0

"""The gateway's links to the formatters: one DEALER per formatter address.

`formatter_urls` lists endpoints (`tcp://host:port`, comma separated); a host name
that resolves to several addresses (a Kubernetes headless Service) gives one link
per address, re-resolved every `RESOLVE_INTERVAL` seconds. Every link is pinged
each `heartbeat_interval`; a link that has not answered within `heartbeat_timeout`
is not used, and the requests it carried end with an error Delta. Each request
goes to the live, ready link with the fewest requests in flight.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import time
from collections import deque
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from shared.protocol import Abort, Delta, FrameError, GenerateRequest, Ping, Pong, decode, encode
from shared.zmq_io import queued
from shared.zmq_security import secure_client

log = logging.getLogger("rose.gateway.formatters")

RESOLVE_INTERVAL = 5.0
HWM = 100_000  # deltas arrive in bursts; the default 1000 would stall a busy link


class NoFormatter(Exception):
    """No live formatter can take the request."""


class BadRequestBody(ValueError):
    """The body cannot be put on the wire (an integer beyond 64 bits, say)."""


def parse_endpoint(url: str) -> tuple[str, str, int]:
    """`tcp://host:port` -> (scheme, host, port); ValueError when it is not one."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("tcp",) or not parts.hostname or parts.port is None:
        raise ValueError(f"formatter endpoint must look like tcp://host:port, got {url!r}")
    return parts.scheme, parts.hostname, parts.port


def _format_endpoint(host: str, port: int) -> str:
    return f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"


def resolve_endpoint(url: str) -> list[str]:
    """One connect address per IP the endpoint's host resolves to (IPv4 preferred)."""
    _, host, port = parse_endpoint(url)
    try:
        ipaddress.ip_address(host)
        return [_format_endpoint(host, port)]
    except ValueError:
        pass
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    v4 = sorted({i[4][0] for i in infos if i[0] == socket.AF_INET})
    v6 = sorted({i[4][0] for i in infos if i[0] == socket.AF_INET6})
    return [_format_endpoint(ip, port) for ip in (v4 or v6)]


@dataclass
class Link:
    """One DEALER to one formatter address."""

    address: str
    socket: zmq.asyncio.Socket
    inflight: set[str] = field(default_factory=set)
    heard_at: float = 0.0
    ready: bool = False
    models: list[str] = field(default_factory=list)
    workers: int = 0
    max_model_len: int = 0
    reader: asyncio.Task | None = None
    watcher: asyncio.Task | None = None


class RequestStream:
    """The Deltas of one request, as they arrive."""

    def __init__(self, request_id: str, link: Link, pool: "FormatterPool"):
        self.request_id = request_id
        self.link = link
        self._pool = pool
        self._deltas: deque[Delta] = deque()
        self._waiter: asyncio.Future | None = None
        self.closed = False

    def put(self, delta: Delta) -> None:
        self._deltas.append(delta)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def next(self) -> Delta:
        """The oldest Delta not yet taken, waiting for one if none is here."""
        while not self._deltas:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._deltas.popleft()

    def poll(self) -> Delta | None:
        """The oldest Delta not yet taken, or None without waiting."""
        return self._deltas.popleft() if self._deltas else None

    def merge_queued(self, delta: Delta, merge) -> None:
        """Fold the Deltas already queued behind `delta` into it while merge(delta, next) accepts."""
        while self._deltas and merge(delta, self._deltas[0]):
            self._deltas.popleft()

    def close(self, abort: bool) -> None:
        """Stop listening; with abort, tell the formatter to stop generating (safe when cancelled)."""
        if self.closed:
            return
        self.closed = True
        self._pool._forget(self.request_id, self.link)
        if abort:
            self._pool._send_nowait(self.link, Abort(self.request_id, "client"))


class FormatterPool:
    def __init__(self, settings, context: zmq.asyncio.Context | None = None):
        self.settings = settings
        self.urls = [u.strip() for u in settings.formatter_urls.split(",") if u.strip()]
        if not self.urls:
            raise ValueError("ROSE_FORMATTER_URLS is empty: the gateway needs at least one formatter endpoint")
        for url in self.urls:
            parse_endpoint(url)
        self.context = context or zmq.asyncio.Context.instance()
        probe = self.context.socket(zmq.DEALER)
        try:
            secure_client(probe, settings)  # bad CURVE key files fail here, at startup
        finally:
            probe.close(0)
        self.links: dict[str, Link] = {}
        self.streams: dict[str, RequestStream] = {}
        self._resolved: dict[str, list[str]] = {}  # endpoint -> addresses, as last resolved
        self._tasks: list[asyncio.Task] = []

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        await self._resolve()
        self._tasks = [asyncio.create_task(self._ping_loop()), asyncio.create_task(self._resolve_loop())]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for stream in list(self.streams.values()):
            stream.close(abort=True)
        for address in list(self.links):
            self._drop_link(address)
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # ------------------------------------------------------------------ state
    def live_links(self) -> list[Link]:
        cutoff = time.monotonic() - self.settings.heartbeat_timeout
        return [link for link in self.links.values() if link.heard_at > cutoff]

    @property
    def ready(self) -> bool:
        return any(link.ready for link in self.live_links())

    @property
    def models(self) -> list[str]:
        names: list[str] = []
        for link in self.live_links():
            names += [m for m in link.models if m not in names]
        return names

    @property
    def max_model_len(self) -> int | None:
        """The longest context a live formatter reports (None: unknown)."""
        return max((link.max_model_len for link in self.live_links()), default=0) or None

    @property
    def inflight(self) -> int:
        return len(self.streams)

    def pick(self) -> Link:
        live = self.live_links()
        candidates = [link for link in live if link.ready] or live
        if not candidates:
            raise NoFormatter("no formatter is reachable")
        return min(candidates, key=lambda link: len(link.inflight))

    # ------------------------------------------------------------------ requests
    def submit(self, request_id: str, endpoint: str, body: dict, trace: dict) -> RequestStream:
        try:
            frame = encode(GenerateRequest(request_id, endpoint, body, trace))
        except (OverflowError, ValueError, TypeError) as exc:  # msgpack holds 64-bit integers at most
            raise BadRequestBody(f"the request cannot be sent on: {exc}") from None
        link = self.pick()
        stream = RequestStream(request_id, link, self)
        self.streams[request_id] = stream
        link.inflight.add(request_id)
        if not self._send_frame(link, frame):
            stream.close(abort=False)
            raise NoFormatter("the formatter is not accepting requests")
        return stream

    def _forget(self, request_id: str, link: Link) -> None:
        self.streams.pop(request_id, None)
        link.inflight.discard(request_id)

    def _send_nowait(self, link: Link, message) -> bool:
        return self._send_frame(link, encode(message))

    def _send_frame(self, link: Link, frame: bytes) -> bool:
        try:
            sent = link.socket.send(frame, zmq.NOBLOCK)
            # zmq.asyncio completes a NOBLOCK send at once and reports a failure in the
            # Future, not by raising. (Sending through a plain shadow socket instead would
            # skip zmq.asyncio's wake-up bookkeeping and can leave the reader asleep.)
            error = sent.exception() if sent.done() else None
            if error is not None:
                raise error
            return True
        except zmq.ZMQError as exc:
            log.warning("cannot send to formatter %s: %s", link.address, exc)
            return False

    # ------------------------------------------------------------------ links
    def _add_link(self, address: str) -> None:
        sock = self.context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, HWM)
        sock.setsockopt(zmq.RCVHWM, HWM)
        secure_client(sock, self.settings)
        sock.connect(address)
        link = Link(address, sock)
        link.reader = asyncio.create_task(self._read_loop(link))
        link.watcher = asyncio.create_task(self._watch_connection(link))
        self.links[address] = link
        self._send_nowait(link, Ping(sent_at=time.time()))
        log.info("formatter link %s added", address)

    def _drop_link(self, address: str) -> None:
        link = self.links.pop(address, None)
        if link is None:
            return
        self._fail_inflight(link, "the formatter went away")
        for task in (link.reader, link.watcher):
            if task is not None:
                task.cancel()
        link.socket.close(0)
        log.info("formatter link %s dropped", address)

    def _fail_inflight(self, link: Link, why: str) -> None:
        for request_id in list(link.inflight):
            stream = self.streams.get(request_id)
            if stream is not None:
                stream.put(Delta(request_id, error=why, status=503, finish_reason="error"))
        link.inflight.clear()

    async def _resolve(self) -> None:
        loop = asyncio.get_running_loop()
        wanted: set[str] = set()
        for url in self.urls:
            try:
                self._resolved[url] = await loop.run_in_executor(None, resolve_endpoint, url)
            except OSError as exc:
                # Keep what we had: a DNS hiccup must not drop working formatters.
                log.warning("cannot resolve %s: %s", url, exc)
            wanted.update(self._resolved.get(url, []))
        for address in sorted(wanted - set(self.links)):
            self._add_link(address)
        for address in set(self.links) - wanted:
            self._drop_link(address)

    async def _resolve_loop(self) -> None:
        while True:
            await asyncio.sleep(RESOLVE_INTERVAL)
            try:
                await self._resolve()
            except Exception:
                log.exception("re-resolving formatter endpoints failed")

    async def _ping_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.heartbeat_interval)
            cutoff = time.monotonic() - self.settings.heartbeat_timeout
            for link in list(self.links.values()):
                if link.inflight and 0 < link.heard_at < cutoff:
                    log.warning("formatter %s silent for %.1fs; failing its requests", link.address, self.settings.heartbeat_timeout)
                    self._fail_inflight(link, "the formatter stopped answering")
                self._send_nowait(link, Ping(sent_at=time.time()))

    async def _watch_connection(self, link: Link) -> None:
        """A dropped TCP connection (the formatter died or restarted) ends its requests
        at once, since a restarted formatter knows nothing of them and would never answer, and
        takes the link out of routing until the formatter answers a ping again."""
        monitor = link.socket.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        try:
            while True:
                event = parse_monitor_message(await monitor.recv_multipart())
                if event["event"] != zmq.EVENT_DISCONNECTED:
                    continue
                # not live until it answers a ping again: no new request waits out the
                # heartbeat timeout on a peer that is gone
                link.heard_at = 0.0
                if link.inflight:
                    log.warning("formatter %s disconnected; failing its %d requests", link.address, len(link.inflight))
                    self._fail_inflight(link, "the connection to the formatter dropped")
        except (asyncio.CancelledError, zmq.ZMQError):
            pass
        finally:
            monitor.close(0)

    async def _read_loop(self, link: Link) -> None:
        """A formatter's messages; one may carry several frames (the Deltas of one worker step)."""
        while True:
            try:
                batch = [await link.socket.recv_multipart()]
                batch += queued(link.socket)
            except asyncio.CancelledError:
                raise
            except zmq.ZMQError as exc:
                log.warning("formatter %s receive failed: %s", link.address, exc)
                return
            link.heard_at = time.monotonic()
            for parts in batch:
                for frame in parts:
                    self._on_frame(link, frame)

    def _on_frame(self, link: Link, frame: bytes) -> None:
        try:
            message = decode(frame)
        except FrameError as exc:
            log.warning("dropping a bad frame from formatter %s: %s", link.address, exc)
            return
        if isinstance(message, Delta):
            stream = self.streams.get(message.request_id)
            if stream is not None and stream.link is link:
                stream.put(message)
        elif isinstance(message, Pong):
            link.ready, link.models, link.workers = message.ready, list(message.models), message.workers
            link.max_model_len = message.max_model_len
        else:
            log.warning("unexpected %s from formatter %s", type(message).__name__, link.address)

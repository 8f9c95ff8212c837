"""`rose gateway`: serve the OpenAI API at settings.host:settings.port.

SIGTERM (or Ctrl-C) drains: /ready and new generations answer 503 at once, the
requests in flight run on for up to `drain_timeout` seconds, then the server stops
and the process exits 0. A second signal stops at once.
"""

from __future__ import annotations

import asyncio
import logging
import time

import uvicorn

from shared import telemetry
from shared.apikeys import ApiKeyError

from .app import create_app

log = logging.getLogger("rose.gateway")

# After the drain, connections still open (idle keep-alives, streams past the
# deadline) get this long before uvicorn cancels them.
CLOSE_GRACE_S = 2


class DrainingServer(uvicorn.Server):
    """uvicorn's server with a drain before its own shutdown, and exit code 0 after it."""

    def __init__(self, config: uvicorn.Config, app, drain_timeout: float):
        super().__init__(config)
        self.app = app
        self.drain_timeout = drain_timeout
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_task: asyncio.Task | None = None

    async def serve(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig, frame) -> None:
        # Not uvicorn's: it re-raises the signal after shutdown, so the process would die of it.
        state = self.app.state
        if state.draining or self._loop is None:
            self.should_exit = True
            self.force_exit = state.draining
            return
        state.draining = True
        state.metrics.draining.set(1)
        self._loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        self._drain_task = self._loop.create_task(self._drain())

    async def _drain(self) -> None:
        pool = self.app.state.pool
        deadline = time.monotonic() + self.drain_timeout
        log.info("draining: %d requests in flight, up to %.0fs", pool.inflight, self.drain_timeout)
        while pool.inflight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if pool.inflight:
            log.warning("drain deadline passed; %d requests are cut short", pool.inflight)
        self.should_exit = True


def main(settings, args=None) -> int:
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        try:
            telemetry.setup_tracing("gateway", settings)
            app = create_app(settings)
        except (ValueError, ApiKeyError) as exc:  # bad endpoints or key file: say so, no traceback
            logging.getLogger("rose.gateway").error("cannot start the gateway: %s", exc)
            return 2
        config = uvicorn.Config(
            app,
            host=settings.host,
            port=settings.port,
            log_level=settings.log_level.lower(),
            access_log=False,
            timeout_graceful_shutdown=CLOSE_GRACE_S,
        )
        DrainingServer(config, app, settings.drain_timeout).run()
    finally:
        telemetry.shutdown_tracing()
    return 0

"""`rose scheduler`: the scheduler process (see services/scheduler/service.py)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import time

import zmq

from services.scheduler.service import Scheduler
from shared.config import Settings
from shared.lifecycle import serve_until_signalled
from shared.telemetry import setup_tracing, shutdown_tracing
from shared.zmq_security import CurveKeyError

log = logging.getLogger("rose.scheduler")


def main(settings: Settings, args: argparse.Namespace | None = None) -> int:
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s scheduler %(levelname)s %(name)s: %(message)s")
    setup_tracing("scheduler", settings)
    try:
        asyncio.run(_serve(settings))
    except (zmq.ZMQError, CurveKeyError) as exc:
        log.error("cannot serve: %s (frontend %s, backend %s)", exc, settings.scheduler_frontend, settings.scheduler_backend)
        return 1
    finally:
        shutdown_tracing()
    return 0


async def _serve(settings: Settings) -> None:
    """Serve until SIGTERM/SIGINT; the first drains (admitted requests finish), a second stops at once."""
    scheduler = Scheduler(settings)

    async def drain() -> None:
        scheduler.draining = True
        log.info("draining: %d requests admitted, up to %.0fs", len(scheduler.requests), settings.drain_timeout)
        deadline = time.monotonic() + settings.drain_timeout
        while scheduler.requests and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    await serve_until_signalled(scheduler.run(), drain)

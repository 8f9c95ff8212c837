"""Serving until a signal, with a graceful drain: what every ZeroMQ service's main shares."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable, Coroutine


async def serve_until_signalled(serve: Coroutine, drain: Callable[[], Awaitable[None]]) -> None:
    """Run `serve` until SIGTERM/SIGINT.

    The first signal runs `drain()` (stop taking work, let in-flight work finish up to
    its own deadline) and stops when it returns; a second signal stops at once.
    """
    serving = asyncio.create_task(serve)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    draining = False

    def on_signal() -> None:
        nonlocal draining
        if draining:
            stop.set()
            return
        draining = True
        loop.create_task(drain()).add_done_callback(lambda _: stop.set())

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    stopped = asyncio.create_task(stop.wait())
    await asyncio.wait([serving, stopped], return_when=asyncio.FIRST_COMPLETED)
    stopped.cancel()
    if not serving.done():
        serving.cancel()
    try:
        await serving
    except asyncio.CancelledError:
        pass

"""The gateway's FastAPI app: routes, OpenAI-shaped errors, body limit, formatter links."""

from __future__ import annotations

import asyncio
import contextlib
import json

import redis.asyncio as aioredis

from fastapi import FastAPI

from shared.apikeys import KeyRing

from .auth import make_limiter
from .errors import error_body, install_error_handlers
from .formatter_link import FormatterPool
from .limits import InflightLimit
from .metrics import Metrics
from .routes import chat, completions, system


class BodyLimit:
    """ASGI middleware: 413 for a body over `limit` bytes, by Content-Length or as it streams.

    The body is read here first (routes read all of it anyway), so a chunked upload
    is refused once it passes the limit, before any route sees it.
    """

    def __init__(self, app, limit: int):
        self.app = app
        self.limit = limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._reject(send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left while sending
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                return await self._reject(send)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()  # later reads wait for http.disconnect

        await self.app(scope, replay, send)

    async def _reject(self, send):
        body = json.dumps(error_body(413, f"the request body is larger than {self.limit} bytes", None, "body_too_large")).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), (b"connection", b"close")]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def create_app(settings, pool: FormatterPool | None = None) -> FastAPI:
    """The app; its lifespan starts the formatter links (or the given pool)."""

    # Made here, not in the lifespan, so a bad ROSE_FORMATTER_URLS fails at once.
    pool = pool or FormatterPool(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await app.state.pool.start()
        try:
            yield
        finally:
            await app.state.pool.stop()
            await asyncio.gather(*app.state.background, return_exceptions=True)
            await app.state.redis.aclose()

    app = FastAPI(title="rose", version="0.1.0", lifespan=lifespan)
    app.state.settings = settings
    app.state.pool = pool
    app.state.metrics = Metrics()
    app.state.keyring = KeyRing.from_settings(settings)
    # from_url connects lazily: without rate limits Redis is never contacted.
    app.state.redis = aioredis.from_url(settings.redis_url)
    app.state.limiter = make_limiter(settings, app.state.redis)
    app.state.draining = False  # set on SIGTERM (main.DrainingServer): /ready and new work answer 503
    app.state.background = set()  # fire-and-forget tasks (token charges), kept referenced
    install_error_handlers(app)
    app.include_router(chat.router)
    app.include_router(completions.router)
    app.include_router(system.router)
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    if settings.max_inflight > 0:
        # Added last, so it runs first: an overloaded gateway refuses before reading the body.
        app.add_middleware(InflightLimit, limit=settings.max_inflight, inflight=lambda: app.state.pool.inflight)
    return app

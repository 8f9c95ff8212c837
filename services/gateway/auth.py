"""Who may call the API, and how often: the dependency every /v1 route takes.

With no keys configured (ROSE_API_KEYS / ROSE_API_KEYS_FILE empty) everyone may;
otherwise the request needs `Authorization: Bearer <key>` of a known key (401).
With rate limits on (ROSE_RATE_LIMIT_RPM / _TPM, or rpm=/tpm= on a key) each key
(all callers together when auth is off) has a request and a token budget in Redis,
shared by every gateway replica; a request over it gets 429 with Retry-After.
The tokens a request used are charged when it ends (`charge_usage`).
"""

from __future__ import annotations

import asyncio
import logging

from fastapi import Request

from shared.apikeys import ApiKey
from shared.ratelimit import RateLimiter

from .errors import APIError

log = logging.getLogger("rose.gateway.auth")

ANONYMOUS = "anonymous"


def make_limiter(settings, redis) -> RateLimiter:
    """The Redis-backed limiter; it only talks to Redis for a key with a limit above 0."""
    return RateLimiter(redis, settings.rate_limit_rpm, settings.rate_limit_tpm)


async def authorize(request: Request) -> ApiKey | None:
    state = request.app.state
    key = None
    if state.keyring.enabled:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        key = state.keyring.check(token.strip()) if scheme.lower() == "bearer" else None
        if key is None:
            raise APIError(401, "invalid or missing API key (send Authorization: Bearer <key>)", None, "invalid_api_key")
    request.state.api_key = key
    admission = await state.limiter.admit(key.name if key else ANONYMOUS, key.rpm if key else None, key.tpm if key else None)
    if not admission.allowed:
        retry = max(1, int(admission.retry_after))
        raise APIError(
            429,
            f"rate limit reached for {admission.limit} per minute; retry in {retry}s",
            None,
            "rate_limit_exceeded",
            {"Retry-After": str(retry)},
        )
    return key


def charge_usage(request: Request, tokens: int) -> None:
    """Debit a finished request's tokens from its key's budget (in the background)."""
    limiter = request.app.state.limiter
    key = getattr(request.state, "api_key", None)
    tpm = key.tpm if key is not None and key.tpm is not None else limiter.tpm
    if tokens <= 0 or tpm <= 0:
        return
    task = asyncio.get_running_loop().create_task(
        limiter.charge_tokens(key.name if key else ANONYMOUS, tokens, key.tpm if key else None)
    )
    # Keep a reference until done: a bare task may be collected mid-flight.
    pending = request.app.state.background
    pending.add(task)
    task.add_done_callback(pending.discard)

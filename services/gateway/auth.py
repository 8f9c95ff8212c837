"""Who may call the API: the dependency every /v1 route takes.

With no keys configured (ROSE_API_KEYS / ROSE_API_KEYS_FILE empty) everyone may;
otherwise the request needs `Authorization: Bearer <key>` of a known key (401).
Per-key rate limits hook in here too, once the gateway has a Redis client.
"""

from __future__ import annotations

from fastapi import Request

from shared.apikeys import ApiKey

from .errors import APIError


async def authorize(request: Request) -> ApiKey | None:
    keyring = request.app.state.keyring
    if not keyring.enabled:
        return None
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    key = keyring.check(token.strip()) if scheme.lower() == "bearer" else None
    if key is None:
        raise APIError(401, "invalid or missing API key (send Authorization: Bearer <key>)", None, "invalid_api_key")
    return key

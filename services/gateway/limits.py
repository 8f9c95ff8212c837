"""Configurable limits on what one request may ask for, checked before it leaves the gateway.

The pydantic schemas hold the hard bounds (what the wire and the engine can carry);
these are the operator's tighter ones (ROSE_MAX_MESSAGES, ROSE_MAX_N, ...). Each
violation is a 400 naming the field, as OpenAI answers. The prompt's length
against the context is checked further down, where it is known in tokens (the
scheduler: prompt alone; the engine: prompt + max_tokens), and also ends in a 400.
"""

from __future__ import annotations

import json

from .errors import APIError, error_body

GENERATION_PATHS = (b"/v1/chat/completions", b"/v1/completions")


def _reject(message: str, param: str) -> APIError:
    return APIError(400, message, param, "invalid_request")


def check_request_limits(body, settings) -> None:
    """APIError(400) for the first limit the validated request body goes over.

    With ROSE_MAX_TOKENS_LIMIT set, a body that names no max_tokens gets the limit.
    """
    n = getattr(body, "n", 1) or 1
    if n > settings.max_n:
        raise _reject(f"n is {n}; at most {settings.max_n} choices are allowed", "n")
    if body.choices > settings.max_n:  # a list of prompts: n generations for each
        raise _reject(f"{body.choices} generations (n x prompts) asked for; at most {settings.max_n} are allowed", "prompt")
    messages = getattr(body, "messages", None)
    if messages is not None and len(messages) > settings.max_messages:
        raise _reject(f"messages has {len(messages)} entries; at most {settings.max_messages} are allowed", "messages")
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stop) > settings.max_stop_strings:
        raise _reject(f"stop has {len(stop)} strings; at most {settings.max_stop_strings} are allowed", "stop")
    longest = max((len(s) for s in stop), default=0)
    if longest > settings.max_stop_string_chars:
        raise _reject(f"a stop string has {longest} characters; at most {settings.max_stop_string_chars} are allowed", "stop")
    named = False
    for name in ("max_tokens", "max_completion_tokens"):
        value = getattr(body, name, None)
        named = named or value is not None
        if value is not None and settings.max_tokens_limit and value > settings.max_tokens_limit:
            raise _reject(f"{name} is {value}; at most {settings.max_tokens_limit} is allowed", name)
    if settings.max_tokens_limit and not named:
        body.max_tokens = settings.max_tokens_limit  # the limit is also the default
    tools = getattr(body, "tools", None)
    if tools:
        if len(tools) > settings.max_tools:
            raise _reject(f"tools has {len(tools)} entries; at most {settings.max_tools} are allowed", "tools")
        size = len(json.dumps([t.model_dump(exclude_none=True) for t in tools], separators=(",", ":")))
        if size > settings.max_tools_bytes:
            raise _reject(f"tools take {size} bytes of JSON; at most {settings.max_tools_bytes} are allowed", "tools")


class InflightLimit:
    """ASGI middleware: 429 for a generation request while the gateway runs `max_inflight`.

    It answers before the body is read or validated, so an overloaded gateway
    refuses in well under a millisecond of its own time; the scheduler's queue
    limit (ROSE_MAX_QUEUE) still holds behind it for several gateways together.
    """

    def __init__(self, app, limit: int, inflight):
        self.app = app
        self.limit = limit
        self.inflight = inflight  # () -> requests this gateway is generating

    async def __call__(self, scope, receive, send):
        if (
            scope["type"] == "http"
            and scope["method"] == "POST"
            and scope.get("raw_path", scope["path"].encode()) in GENERATION_PATHS
            and self.inflight() >= self.limit
        ):
            message = f"this gateway is generating {self.limit} requests, its limit; retry later"
            body = json.dumps(error_body(429, message, None, "overloaded")).encode()
            headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), (b"retry-after", b"1")]
            await send({"type": "http.response.start", "status": 429, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            return
        await self.app(scope, receive, send)

"""One request's run through the mesh, as the routes see it: Deltas until every choice ends.

`Generation.start` validates the model, sends the request to a formatter and waits
for the first Delta, so that an early refusal (429 overloaded, 400 prompt too
long, 503 no worker) is raised as an `APIError` with its real status before any
response header goes out. Iterating then yields the rest. A Delta with an error
after that raises `GenerationFailed`; the deadline (`request_timeout`) aborts the
request and raises too. `close()` aborts whatever still runs (client gone).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field

from fastapi import Request
from opentelemetry.trace import SpanKind

from shared import telemetry
from shared.protocol import Delta

from .auth import charge_usage
from .errors import APIError
from .formatter_link import BadRequestBody, FormatterPool, NoFormatter
from .limits import check_request_limits
from .metrics import Metrics


CLIENT_POLL_S = 0.5  # how often a request still waiting for its first token checks its client


class GenerationFailed(Exception):
    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.message = message
        self.status = status


@dataclass
class UsageTotals:
    """Token counts over all choices (Delta counters are per choice and cumulative)."""

    prompt_tokens: int = 0
    completion: dict[int, int] = field(default_factory=dict)
    reasoning: dict[int, int] = field(default_factory=dict)
    cached: dict[int, int] = field(default_factory=dict)

    def add(self, delta: Delta) -> None:
        self.prompt_tokens = max(self.prompt_tokens, delta.prompt_tokens)
        self.completion[delta.index] = max(self.completion.get(delta.index, 0), delta.completion_tokens)
        self.reasoning[delta.index] = max(self.reasoning.get(delta.index, 0), delta.reasoning_tokens)
        self.cached[delta.index] = max(self.cached.get(delta.index, 0), delta.cached_tokens)

    def as_dict(self) -> dict:
        completion = sum(self.completion.values())
        # Choices share one prompt; the best cache hit among them is what the prompt saved.
        cached = min(self.prompt_tokens, max(self.cached.values(), default=0))
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": self.prompt_tokens + completion,
            "prompt_tokens_details": {"cached_tokens": cached},
            "completion_tokens_details": {"reasoning_tokens": sum(self.reasoning.values())},
        }


class Generation:
    def __init__(self, request: Request, pool: FormatterPool, stream, endpoint: str, model: str, choices: int, timeout: float, metrics: Metrics, span):
        self.request = request
        self.pool = pool
        self.stream = stream
        self.endpoint = endpoint
        self.model = model
        self.choices = choices
        self.request_id = stream.request_id
        self.created = int(time.time())
        self.started = time.monotonic()
        self.deadline = self.started + timeout
        self.usage = UsageTotals()
        self.finished: set[int] = set()
        self.metrics = metrics
        self.span = span
        self._first: Delta | None = None
        self._status = 200

    @classmethod
    async def start(cls, request: Request, endpoint: str, body, prefix: str) -> "Generation":
        state = request.app.state
        pool: FormatterPool = state.pool
        models = pool.models
        if state.draining:
            raise APIError(503, "the gateway is shutting down; retry on another replica", None, "draining", {"Retry-After": "1"})
        if not pool.ready or not models:
            raise APIError(503, "no model is ready to serve yet", None, "not_ready", {"Retry-After": "1"})
        if body.model not in models:
            raise APIError(404, f"the model {body.model!r} does not exist; serving {', '.join(models)}", "model", "model_not_found")
        check_request_limits(body, state.settings)
        limit = state.settings.max_inflight
        if limit and pool.inflight >= limit:  # InflightLimit refuses most; this catches a burst that passed it together
            raise APIError(429, f"this gateway is generating {pool.inflight} requests, its limit; retry later", None, "overloaded", {"Retry-After": "1"})
        request_id = f"{prefix}-{uuid.uuid4().hex}"
        # A caller that sends a W3C traceparent header gets the request inside its own trace.
        incoming = {k: v for k, v in request.headers.items() if k in ("traceparent", "tracestate")}
        span = telemetry.tracer("rose.gateway").start_span(
            "gateway.request",
            context=telemetry.extract(incoming),
            kind=SpanKind.SERVER,
            attributes={"rose.request_id": request_id, "rose.endpoint": endpoint},
        )
        with telemetry.use_span(span):
            carrier = telemetry.inject({})
        try:
            stream = pool.submit(request_id, endpoint, body.model_dump(exclude_none=True), carrier)
        except NoFormatter as exc:
            span.end()
            raise APIError(503, str(exc), None, "not_ready", {"Retry-After": "1"}) from None
        except BadRequestBody as exc:
            span.end()
            raise APIError(400, str(exc), None, "invalid_request") from None
        gen = cls(request, pool, stream, endpoint, body.model, body.choices, state.settings.request_timeout, state.metrics, span)
        state.metrics.in_flight.inc()
        try:
            # A queued request whose client left must not wait for a slot.
            first = await gen._next(watch_client=True)
        except GenerationFailed as exc:
            gen.close(abort=True, status=exc.status)
            headers = {"Retry-After": "1"} if exc.status in (429, 503) else None
            raise APIError(exc.status, exc.message, None, _error_code(exc.status), headers) from None
        except BaseException:
            gen.close(abort=True, status=499)
            raise
        gen._first = first
        gen.metrics.ttft.labels(endpoint).observe(time.monotonic() - gen.started)
        span.add_event("first_delta")
        return gen

    @property
    def done(self) -> bool:
        return len(self.finished) >= self.choices

    async def _next(self, watch_client: bool = False) -> Delta:
        """The next Delta; with watch_client, notice a client that left while we wait."""
        while True:
            remaining = self.deadline - time.monotonic()
            if remaining <= 0:
                raise GenerationFailed(f"the request did not finish within {self.pool.settings.request_timeout:g}s", 504)
            delta = self.stream.poll()  # one already here needs no timer
            if delta is not None:
                break
            try:
                delta = await asyncio.wait_for(self.stream.next(), timeout=min(remaining, CLIENT_POLL_S) if watch_client else remaining)
                break
            except asyncio.TimeoutError:
                if watch_client and await self.request.is_disconnected():
                    raise GenerationFailed("the client closed the request", 499) from None
        # Deltas already queued behind this one (the client is behind, or one worker step
        # brought several): one chunk carries them, as vLLM coalesces when it lags.
        self.stream.merge_queued(delta, merge_delta)
        if delta.error:
            raise GenerationFailed(delta.error, delta.status or 500)
        if not 0 <= delta.index < self.choices:
            raise GenerationFailed(f"the formatter sent choice {delta.index} of {self.choices}", 502)
        self.usage.add(delta)
        if delta.finish_reason is not None:
            self.finished.add(delta.index)
        return delta

    async def deltas(self):
        """Every Delta of the request, the first one included, until all choices finished."""
        if self._first is not None:
            first, self._first = self._first, None
            yield first
        while not self.done:
            yield await self._next()

    def close(self, abort: bool = False, status: int | None = None) -> None:
        """End the request here (abort below if it still runs); record its metrics once."""
        if self.stream.closed:
            return
        aborting = abort or not self.done
        self.stream.close(abort=aborting)
        if status is not None:
            self._status = status
        if aborting:
            self.metrics.aborted.labels(_abort_reason(self._status)).inc()
        self.metrics.in_flight.dec()
        self.metrics.requests.labels(self.endpoint, str(self._status)).inc()
        self.metrics.latency.labels(self.endpoint).observe(time.monotonic() - self.started)
        usage = self.usage.as_dict()
        self.metrics.prompt_tokens.inc(usage["prompt_tokens"])
        self.metrics.completion_tokens.inc(usage["completion_tokens"])
        charge_usage(self.request, usage["total_tokens"])
        self.span.set_attribute("http.status_code", self._status)
        self.span.set_attribute("rose.completion_tokens", usage["completion_tokens"])
        self.span.end()


def merge_delta(into: Delta, later: Delta) -> bool:
    """Append `later` to `into` when one chunk can say both in order; False (nothing changed) if not.

    Only text of one choice merges: not an error, not tool calls, nothing after a
    finish, and not reasoning after content (a chunk puts reasoning first).
    """
    if (later.index != into.index or into.finish_reason is not None or into.error or later.error
            or into.tool_calls or later.tool_calls or (into.content and later.reasoning_content)):
        return False
    into.reasoning_content += later.reasoning_content
    into.content += later.content
    into.token_ids += later.token_ids
    into.logprobs += later.logprobs
    into.finish_reason = later.finish_reason
    into.prompt_tokens = max(into.prompt_tokens, later.prompt_tokens)
    into.completion_tokens = max(into.completion_tokens, later.completion_tokens)
    into.reasoning_tokens = max(into.reasoning_tokens, later.reasoning_tokens)
    into.cached_tokens = max(into.cached_tokens, later.cached_tokens)
    return True


def _abort_reason(status: int) -> str:
    """Why a request was cut short, as the aborts metric labels it."""
    return {499: "client_gone", 504: "timeout"}.get(status, "error" if status >= 400 else "other")


def _error_code(status: int) -> str | None:
    return {400: "invalid_request", 429: "overloaded", 503: "not_ready", 504: "timeout"}.get(status)

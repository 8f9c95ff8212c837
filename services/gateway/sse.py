"""Server-sent events as OpenAI streams them: `data: <json>` blocks, then `data: [DONE]`."""

from __future__ import annotations

import asyncio
import json
from typing import AsyncIterator, Callable

from fastapi import Request
from fastapi.responses import StreamingResponse

from .errors import APIError, error_body
from .generation import Generation, GenerationFailed

DONE = "data: [DONE]\n\n"


# Characters that str.splitlines() (and so httpx's aiter_lines, among other clients)
# takes as line ends: escaped, an event is always one line to every reader.
_LINE_BREAKS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def json_text(value) -> str:
    """Compact JSON with no character that a line reader splits on."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).translate(_LINE_BREAKS)


def event(payload: dict) -> str:
    return "data: " + json_text(payload) + "\n\n"


class ChunkEvents:
    """The chunk events of one streamed response, written as text around the choices.

    `choices(text)` with the JSON text of the choices array's items gives the same
    characters as `event({"id": ..., "object": ..., "created": ..., "model": ...,
    "choices": [...], ("usage": None)})`, without building and encoding the dicts of
    every chunk again.
    """

    def __init__(self, gen: Generation, object_name: str, include_usage: bool):
        head = json_text({"id": gen.request_id, "object": object_name, "created": gen.created, "model": gen.model})
        self._open = "data: " + head[:-1] + ',"choices":['
        self._close = '],"usage":null}\n\n' if include_usage else "]}\n\n"

    def choices(self, items: str) -> str:
        return self._open + items + self._close

    def usage(self, usage: dict) -> str:
        """The last chunk of include_usage: no choices, the request's usage."""
        return self._open + '],"usage":' + json_text(usage) + "}\n\n"


def stream_response(gen: Generation, chunks: Callable[[Generation], AsyncIterator[str]]) -> StreamingResponse:
    """The SSE response for a started generation (chunks yields whole events); an error midway becomes an error event."""

    async def body():
        status = 200
        try:
            async for text in chunks(gen):
                yield text
        except GenerationFailed as exc:
            status = exc.status
            yield event(error_body(exc.status, exc.message))
        except asyncio.CancelledError:
            status = 499  # the client went away; close() aborts the generation below
            raise
        finally:
            gen.close(abort=not gen.done, status=status)
        yield DONE

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no", "X-Request-Id": gen.request_id}
    return GenerationStream(gen, body(), media_type="text/event-stream", headers=headers)


class GenerationStream(StreamingResponse):
    """A StreamingResponse that ends its generation even if the body never starts
    (a client gone between the headers and the first chunk)."""

    def __init__(self, gen: Generation, content, **kwargs):
        super().__init__(content, **kwargs)
        self._gen = gen

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._gen.close(abort=not self._gen.done, status=499)  # no-op when the body closed it


async def collect(request: Request, gen: Generation, consume: Callable[[Generation], AsyncIterator[None]]) -> None:
    """Run a non-streamed generation to its end, aborting it if the client disconnects."""
    task = asyncio.ensure_future(_drain(consume(gen)))
    try:
        while not task.done():
            await asyncio.wait({task}, timeout=1.0)
            if not task.done() and await request.is_disconnected():
                task.cancel()
                gen.close(abort=True, status=499)
                break
        await task
    except asyncio.CancelledError:
        gen.close(abort=True, status=499)
        raise
    except GenerationFailed as exc:
        gen.close(abort=True, status=exc.status)
        raise APIError(exc.status, exc.message, None, None) from None
    gen.close(status=200)


async def _drain(iterator: AsyncIterator[None]) -> None:
    async for _ in iterator:
        pass

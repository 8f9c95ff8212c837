"""One streamed request, timed: over the OpenAI API (SSE) or an in-process AsyncEngine.

Both give a `RequestRecord`: when each chunk of output arrived (seconds after the
request was sent) and how many tokens it carried, the token count the server
reported, and how the request ended. bench/serve.py turns records into TTFT, TPOT
and ITL.

`post_sse` is a small HTTP/1.1 client for benchmarks whose client shares the
server's cores: it reads an SSE response for a fraction of httpx's CPU per chunk.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from urllib.parse import urlsplit


@dataclass
class RequestRecord:
    """One request's timeline; times are seconds after it was sent."""

    prompt_tokens: int
    requested_tokens: int  # max_tokens asked for
    sent_at: float = 0.0  # perf_counter when sent
    chunk_times: list[float] = field(default_factory=list)  # arrivals of chunks with output
    chunk_tokens: list[int | None] = field(default_factory=list)  # tokens per chunk; None when unknown
    output_tokens: int = 0  # the server's count (usage), or the tokens received in process
    cached_tokens: int = 0  # prompt tokens the server took from its prefix cache (usage)
    latency: float = 0.0  # until the stream ended
    finish_reason: str | None = None
    error: str | None = None
    request_id: str | None = None  # the server's id for it (the chunks' "id")
    # where its time to first token went, ms (bench.mesh_trace for the mesh, the engine's own times in process)
    ttft_stages: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.error is None and self.output_tokens > 0

    @property
    def ttft(self) -> float:
        return self.chunk_times[0] if self.chunk_times else float("nan")

    @property
    def tpot(self) -> float | None:
        """Time per output token after the first (vLLM's definition); None for one token."""
        if self.output_tokens < 2 or not self.chunk_times:
            return None
        return (self.latency - self.ttft) / (self.output_tokens - 1)

    @property
    def itls(self) -> list[float]:
        """Gaps between consecutive output chunks."""
        return [b - a for a, b in zip(self.chunk_times, self.chunk_times[1:])]

    @property
    def streamed_tokens(self) -> int | None:
        """Tokens counted in the stream itself; None when some chunk did not say."""
        if any(n is None for n in self.chunk_tokens):
            return None
        return sum(self.chunk_tokens)


async def stream_completion(base_url: str, model: str, prompt: list[int], max_tokens: int, *,
                            ignore_eos: bool = True, stream_logprobs: bool = False,
                            extra: dict | None = None) -> RequestRecord:
    """POST /v1/completions with stream=true, read by post_sse; errors end up in the record.

    stream_logprobs asks for logprobs=0 so every chunk lists its tokens: the tokens
    streamed can then be counted (chunk_tokens), not only read from usage. The lean
    client keeps the measurement off the client's CPU: at 64 streams (~2,700 chunks/s)
    httpx's per-chunk work delayed what the client saw by tens of ms (docs/BENCHMARKS.md).
    """
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "stream": True,
            "ignore_eos": ignore_eos, "stream_options": {"include_usage": True}, **(extra or {})}
    if stream_logprobs:
        body["logprobs"] = 0
    record = RequestRecord(prompt_tokens=len(prompt), requested_tokens=max_tokens)
    record.sent_at = start = time.perf_counter()
    try:
        async for chunk in post_sse(base_url, "/v1/completions", body):
            now = time.perf_counter() - start
            if record.request_id is None:
                record.request_id = chunk.get("id")
            if "error" in chunk:
                record.error = f"stream error: {chunk['error']}"
                continue
            if chunk.get("usage"):
                record.output_tokens = int(chunk["usage"]["completion_tokens"])
                record.cached_tokens = int((chunk["usage"].get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
            for choice in chunk.get("choices", []):
                logprobs = choice.get("logprobs")
                tokens = len(logprobs["tokens"]) if stream_logprobs and logprobs else None
                if choice.get("text") or tokens:
                    record.chunk_times.append(now)
                    record.chunk_tokens.append(tokens)
                if choice.get("finish_reason"):
                    record.finish_reason = choice["finish_reason"]
    except Exception as exc:  # noqa: BLE001 - a failed request is data, not a crash of the benchmark
        record.error = f"{type(exc).__name__}: {exc}"
    record.latency = time.perf_counter() - start
    return record


async def stream_engine(engine, request_id: str, prompt: list[int], params) -> RequestRecord:
    """The same request through an AsyncEngine in this process (no mesh)."""
    record = RequestRecord(prompt_tokens=len(prompt), requested_tokens=params.max_tokens)
    record.sent_at = start = time.perf_counter()
    try:
        async for out in engine.generate(request_id, prompt, params):
            if out.token_ids:
                if not record.chunk_times:
                    first = time.monotonic()
                record.chunk_times.append(time.perf_counter() - start)
                record.chunk_tokens.append(len(out.token_ids))
                record.output_tokens += len(out.token_ids)
            record.cached_tokens = max(record.cached_tokens, out.cached_tokens)
            if out.error:
                record.error = out.error
            if out.finish_reason:
                record.finish_reason = out.finish_reason
            if out.times is not None and out.times.first_token is not None:
                ms = out.times.latencies_ms()
                record.ttft_stages = {"engine queue": ms["queue"], "engine prefill": ms["prefill"],
                                      "to the client": 1000 * (first - out.times.first_token)}
    except Exception as exc:  # noqa: BLE001
        record.error = f"{type(exc).__name__}: {exc}"
    record.request_id = request_id
    record.latency = time.perf_counter() - start
    return record


async def post_sse(base_url: str, path: str, body: dict) -> AsyncIterator[dict]:
    """POST body as JSON on a connection of its own; yield each `data: {...}` event, parsed.

    The rest of an SSE stream (`data: [DONE]`, comments) is skipped. A status other
    than 200 raises RuntimeError with the start of the response. Handles a chunked or
    a close-delimited body, which is what an ASGI server streams.
    """
    url = urlsplit(base_url)
    reader, writer = await asyncio.open_connection(url.hostname, url.port or 80)
    try:
        payload = json.dumps(body).encode()
        writer.write(f"POST {path} HTTP/1.1\r\nHost: {url.netloc}\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n".encode() + payload)
        head = await reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        chunked = b"\r\ntransfer-encoding: chunked\r\n" in head.lower()
        if status != 200:
            rest = b"".join([piece async for piece in _body(reader, chunked)])
            raise RuntimeError(f"HTTP {status}: {rest[:200]!r}")
        pending = b""
        async for piece in _body(reader, chunked):
            pending += piece
            *events, pending = pending.split(b"\n\n")
            for event in events:
                if event.startswith(b"data: {"):
                    yield json.loads(event[6:])
    finally:
        writer.close()


async def _body(reader: asyncio.StreamReader, chunked: bool) -> AsyncIterator[bytes]:
    """The pieces of a response body as they arrive."""
    if not chunked:
        while piece := await reader.read(65536):
            yield piece
        return
    while True:
        size = int((await reader.readline()).split(b";")[0], 16)
        if size == 0:
            return
        yield await reader.readexactly(size)
        await reader.readexactly(2)  # the CRLF after each chunk


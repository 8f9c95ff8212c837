"""bench.streaming.post_sse against a real socket: chunked and close-delimited SSE bodies."""

import asyncio
import json

import pytest

from bench.streaming import post_sse

EVENTS = [{"id": "a", "choices": [{"text": "x\\n\\ny"}]}, {"id": "a", "choices": [], "usage": {"completion_tokens": 2}}]
SSE = "".join(f"data: {json.dumps(e)}\n\n" for e in EVENTS).encode() + b": comment\n\ndata: [DONE]\n\n"


async def serve_once(response_for) -> tuple[asyncio.AbstractServer, list[bytes]]:
    requests = []

    async def handle(reader, writer):
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
        requests.append(head + await reader.readexactly(length))
        for piece in response_for():
            writer.write(piece)
            await writer.drain()
            await asyncio.sleep(0.01)  # the client reads pieces as they come
        writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0), requests


def chunked(body: bytes, sizes: list[int]):
    yield b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
    at = 0
    for size in sizes + [len(body)]:
        piece, at = body[at:at + size], at + size
        if piece:
            yield b"%x\r\n%s\r\n" % (len(piece), piece)
    yield b"0\r\n\r\n"


async def events_from(response_for, body=None):
    server, requests = await serve_once(response_for)
    port = server.sockets[0].getsockname()[1]
    async with server:
        got = [e async for e in post_sse(f"http://127.0.0.1:{port}", "/v1/completions", body or {"stream": True})]
    return got, requests


@pytest.mark.parametrize("sizes", [[], [5, 7, 1, 30], [1] * 40])
def test_events_split_anywhere_by_chunks_come_out_whole(sizes):
    got, requests = asyncio.run(events_from(lambda: chunked(SSE, sizes), {"prompt": [1, 2]}))
    assert got == EVENTS
    assert requests[0].startswith(b"POST /v1/completions HTTP/1.1\r\n") and requests[0].endswith(b'{"prompt": [1, 2]}')


def test_a_close_delimited_body_is_read_to_the_end():
    response = lambda: [b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\r\n", SSE[:9], SSE[9:]]  # noqa: E731
    assert asyncio.run(events_from(response))[0] == EVENTS


def test_an_error_status_raises_with_the_body():
    response = lambda: chunked(b'{"error": "no"}', [4])  # noqa: E731
    failing = lambda: [next(response()).replace(b"200 OK", b"429 Too Many Requests"), *list(response())[1:]]  # noqa: E731
    with pytest.raises(RuntimeError, match=r"HTTP 429: .*error"):
        asyncio.run(events_from(failing))

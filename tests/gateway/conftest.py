"""A gateway served by uvicorn in the test's event loop, linked over real ZeroMQ sockets
to a formatter endpoint the test drives (`FormatterPeer`), so every answer a formatter
can give (deltas, refusals, silence) can be produced on demand."""

from __future__ import annotations

import asyncio
import socket

import httpx
import pytest
import pytest_asyncio
import uvicorn
import zmq
import zmq.asyncio

from services.gateway.app import create_app
from shared.config import Settings
from shared.protocol import Abort, Delta, GenerateRequest, Ping, Pong, decode, encode

MODEL = "tiny"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def hello_deltas(request: GenerateRequest) -> list[Delta]:
    """Two content pieces per choice, then stop; counters as a formatter sends them."""
    n = request.body.get("n", 1)
    out = []
    for i in range(n):
        out.append(Delta(request.request_id, index=i, content="Hel", prompt_tokens=7, completion_tokens=1))
        out.append(Delta(request.request_id, index=i, content="lo", finish_reason="stop", prompt_tokens=7, completion_tokens=2, reasoning_tokens=0, cached_tokens=3))
    return out


class FormatterPeer:
    """The formatter end of the gateway's link: a ROUTER answering as the test says."""

    def __init__(self, address: str):
        self.address = address
        self.socket = zmq.asyncio.Context.instance().socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.bind(address)
        self.requests: list[GenerateRequest] = []
        self.aborts: list[Abort] = []
        self.respond = hello_deltas  # GenerateRequest -> list of Deltas (or None: stay silent)
        self.answer_pings = True
        self.ready = True
        self._task = asyncio.create_task(self._serve())

    async def _serve(self):
        while True:
            peer, frame = await self.socket.recv_multipart()
            message = decode(frame)
            if isinstance(message, Ping):
                if self.answer_pings:
                    await self.socket.send_multipart([peer, encode(Pong(message.sent_at, self.ready, [MODEL], 1))])
            elif isinstance(message, GenerateRequest):
                self.requests.append(message)
                for delta in self.respond(message) or []:
                    await self.socket.send_multipart([peer, encode(delta)])
            elif isinstance(message, Abort):
                self.aborts.append(message)

    async def close(self):
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        self.socket.close(0)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def peer():
    p = FormatterPeer(f"tcp://127.0.0.1:{free_port()}")
    yield p
    await p.close()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def gateway(peer):
    """Base URL of a served gateway whose one formatter is `peer`."""
    port = free_port()
    settings = Settings(
        formatter_urls=peer.address,
        heartbeat_interval=0.05,
        heartbeat_timeout=0.5,
        max_body_bytes=20_000,
        request_timeout=1.0,
        port=port,
    )
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning"))
    task = asyncio.create_task(server.serve())
    url = f"http://127.0.0.1:{port}"
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        for _ in range(200):
            try:
                if (await client.get("/ready")).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.05)
        else:
            raise RuntimeError("the test gateway never became ready")
    yield url
    server.should_exit = True
    await task


@pytest_asyncio.fixture(loop_scope="module")
async def client(gateway, peer):
    peer.respond, peer.answer_pings, peer.ready = hello_deltas, True, True
    peer.requests.clear(), peer.aborts.clear()
    async with httpx.AsyncClient(base_url=gateway, timeout=10) as c:
        yield c

"""Receiving from zmq.asyncio sockets in batches."""

from __future__ import annotations

import zmq
import zmq.asyncio


def queued(sock: zmq.asyncio.Socket, limit: int = 512) -> list[list[bytes]]:
    """Messages already waiting on a socket, taken without going back to the event loop."""
    out = []
    for _ in range(limit):
        got = sock.recv_multipart(flags=zmq.NOBLOCK)  # zmq.asyncio: an already finished future
        if got.exception() is not None:
            break
        out.append(got.result())
    return out

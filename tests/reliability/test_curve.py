"""CURVE on the internal links: a mesh with it on serves as usual, and a peer without
the right keys gets nothing through (no Pong, no registration), while a peer with
them does (the control that the probe itself works)."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import time

import pytest
import zmq
import zmq.auth

from shared.config import Settings
from shared.protocol import Ping, Pong, Register, decode, encode
from shared.zmq_security import secure_client, write_key_pairs

from .harness import assert_serving, ready_workers

pytestmark = [pytest.mark.e2e]


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> dict[str, str]:
    return write_key_pairs(str(tmp_path_factory.mktemp("curve")))


@pytest.fixture(scope="module")
def secured(mesh, keys):
    return mesh(formatters=1, workers=1, env=keys)


def pong_from(endpoint: str, setup=None, wait_s: float = 1.5) -> Pong | None:
    """Ping a ROUTER at endpoint over a fresh DEALER (set up by `setup`); its Pong or None."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        if setup is not None:
            setup(sock)
        sock.connect(endpoint)
        deadline = time.monotonic() + wait_s
        sock.send(encode(Ping(sent_at=time.time())), zmq.NOBLOCK)
        while time.monotonic() < deadline:
            if sock.poll(100):
                message = decode(sock.recv())
                if isinstance(message, Pong):
                    return message
        return None
    finally:
        sock.close(0)
        ctx.term()


def key_settings(keys: dict[str, str], **changes) -> Settings:
    base = Settings.from_env({k: v for k, v in keys.items()})
    return dataclasses.replace(base, **changes)


def test_mesh_serves_with_curve_on(secured):
    asyncio.run(assert_serving(secured.url))


def test_a_peer_without_keys_gets_nothing(secured):
    assert pong_from(secured.settings.scheduler_frontend) is None
    assert pong_from(secured.formatter_binds()[0]) is None


def test_a_peer_with_an_unknown_client_key_gets_nothing(secured, keys, tmp_path):
    stranger_public, stranger_secret = zmq.auth.create_certificates(str(tmp_path), "stranger")
    settings = key_settings(keys, curve_client_key=stranger_secret)
    assert pong_from(secured.settings.scheduler_frontend, lambda s: secure_client(s, settings)) is None
    assert pong_from(secured.formatter_binds()[0], lambda s: secure_client(s, settings)) is None


def test_a_rogue_worker_cannot_register(secured):
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(secured.settings.scheduler_backend)
    try:
        for _ in range(10):
            try:
                sock.send(encode(Register("rogue", "gpt-oss-tiny", 1024, 16, 64, 4)), zmq.NOBLOCK)
            except zmq.Again:  # no peer to queue for: the handshake did not complete
                pass
            time.sleep(0.1)
        # without CURVE the scheduler would list it (it stays for heartbeat_timeout)
        assert ready_workers(secured.url) == 1
    finally:
        sock.close(0)
        ctx.term()


def test_a_peer_with_the_keys_gets_through(secured, keys):
    settings = key_settings(keys)
    pong = pong_from(secured.settings.scheduler_frontend, lambda s: secure_client(s, settings))
    assert pong is not None and pong.ready and pong.workers == 1
    assert pong_from(secured.formatter_binds()[0], lambda s: secure_client(s, settings)) is not None
    assert os.path.exists(keys["ROSE_CURVE_AUTHORIZED_KEYS"])

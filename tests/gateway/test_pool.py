"""Formatter endpoints: parsing, DNS fan-out, least-in-flight choice over two live formatters."""

import asyncio

import pytest

from services.gateway.formatter_link import FormatterPool, NoFormatter, parse_endpoint, resolve_endpoint
from shared.config import Settings

from .conftest import FormatterPeer, free_port




def test_endpoints_parse_and_resolve():
    assert parse_endpoint("tcp://10.0.0.1:5601") == ("tcp", "10.0.0.1", 5601)
    assert resolve_endpoint("tcp://10.0.0.1:5601") == ["tcp://10.0.0.1:5601"]
    assert resolve_endpoint("tcp://localhost:5601") == ["tcp://127.0.0.1:5601"]
    for bad in ("http://x:1", "tcp://nohost", "5601", "tcp://:5601"):
        with pytest.raises(ValueError):
            parse_endpoint(bad)
    with pytest.raises(ValueError, match="tcp://host:port"):
        FormatterPool(Settings(formatter_urls="tcp://a:1,udp://b:2"))
    with pytest.raises(ValueError, match="empty"):
        FormatterPool(Settings(formatter_urls=" , "))


@pytest.mark.asyncio(loop_scope="module")
async def test_requests_go_to_the_least_busy_live_formatter():
    peers = [FormatterPeer(f"tcp://127.0.0.1:{free_port()}") for _ in range(2)]
    for p in peers:
        p.respond = lambda req: None  # keep every request in flight
    # one of them named by host name, as a DNS entry would be
    urls = f"{peers[0].address},{peers[1].address.replace('127.0.0.1', 'localhost')}"
    pool = FormatterPool(Settings(formatter_urls=urls, heartbeat_interval=0.05, heartbeat_timeout=0.5))
    await pool.start()
    try:
        for _ in range(100):
            if len(pool.live_links()) == 2:
                break
            await asyncio.sleep(0.02)
        assert pool.ready and pool.models == ["tiny"]
        streams = [pool.submit(f"r{i}", "chat", {}, {}) for i in range(6)]
        await asyncio.sleep(0.2)
        assert sorted(len(p.requests) for p in peers) == [3, 3]
        streams[0].close(abort=True)
        streams[2].close(abort=True)
        streams[4].close(abort=True)
        await asyncio.sleep(0.1)
        busy = max(pool.links.values(), key=lambda link: len(link.inflight))
        quiet = min(pool.links.values(), key=lambda link: len(link.inflight))
        assert len(busy.inflight) > len(quiet.inflight)
        assert pool.submit("r-next", "chat", {}, {}).link is quiet
        peers[0].answer_pings = peers[1].answer_pings = False
        await asyncio.sleep(0.7)
        with pytest.raises(NoFormatter):
            pool.submit("r-late", "chat", {}, {})
        assert not pool.ready
    finally:
        await pool.stop()
        for p in peers:
            await p.close()


@pytest.mark.asyncio(loop_scope="module")
async def test_an_unresolvable_name_is_not_ready_and_does_not_crash():
    pool = FormatterPool(Settings(formatter_urls="tcp://no-such-formatter.invalid:5601", heartbeat_interval=0.05))
    await pool.start()
    try:
        assert pool.links == {} and not pool.ready
        with pytest.raises(NoFormatter):
            pool.submit("r", "chat", {}, {})
    finally:
        await pool.stop()


@pytest.mark.asyncio(loop_scope="module")
async def test_a_dropped_connection_fails_requests_before_the_heartbeat_timeout():
    peer = FormatterPeer(f"tcp://127.0.0.1:{free_port()}")
    peer.respond = lambda req: None
    pool = FormatterPool(Settings(formatter_urls=peer.address, heartbeat_interval=0.05, heartbeat_timeout=30))
    await pool.start()
    try:
        for _ in range(100):
            if pool.ready:
                break
            await asyncio.sleep(0.02)
        stream = pool.submit("r1", "chat", {}, {})
        await asyncio.sleep(0.1)
        await peer.close()  # the formatter process goes away
        delta = await asyncio.wait_for(stream.next(), timeout=5)  # far below the 30 s timeout
        assert delta.status == 503 and "dropped" in delta.error
    finally:
        await pool.stop()

"""API keys and per-key rate limits at the gateway (a second app on the same formatter peer)."""

import asyncio
import contextlib

import httpx
import pytest

from services.gateway.app import create_app
from shared.config import Settings

pytestmark = pytest.mark.asyncio(loop_scope="module")

CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}


@contextlib.asynccontextmanager
async def serving(settings):
    """The app with its lifespan running, reached in-process; waits until it is ready."""
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://gw") as client:
            for _ in range(100):
                if (await client.get("/ready")).status_code == 200:
                    break
                await asyncio.sleep(0.02)
            client.app = app
            yield client


async def test_keys_are_required_when_configured(peer, redis_url):
    settings = Settings(formatter_urls=peer.address, heartbeat_interval=0.05, api_keys="sk-good", redis_url=redis_url)
    async with serving(settings) as client:
        for headers in ({}, {"Authorization": "Bearer sk-bad"}, {"Authorization": "Basic sk-good"}):
            r = await client.post("/v1/chat/completions", json=CHAT, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert (await client.get("/v1/models")).status_code == 401
        assert (await client.get("/health")).status_code == 200  # open_health
        good = {"Authorization": "Bearer sk-good"}
        r = await client.post("/v1/chat/completions", json=CHAT, headers=good)
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "Hello"


async def test_requests_per_minute_limit(peer, redis_url, tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("sk-a name=team-a rpm=2\nsk-b name=team-b\n")
    settings = Settings(formatter_urls=peer.address, heartbeat_interval=0.05, api_keys_file=str(keys), redis_url=redis_url)
    async with serving(settings) as client:
        a, b = {"Authorization": "Bearer sk-a"}, {"Authorization": "Bearer sk-b"}
        codes = [(await client.post("/v1/completions", json={"model": "tiny", "prompt": "x"}, headers=a)).status_code for _ in range(3)]
        assert codes == [200, 200, 429]
        r = await client.post("/v1/completions", json={"model": "tiny", "prompt": "x"}, headers=a)
        assert r.json()["error"]["type"] == "rate_limit_error" and int(r.headers["retry-after"]) >= 1
        assert (await client.post("/v1/completions", json={"model": "tiny", "prompt": "x"}, headers=b)).status_code == 200


async def test_tokens_per_minute_are_charged_after_the_request(peer, redis_url, tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("sk-t name=team-tokens tpm=12\n")  # each answer from the peer uses 7 + 2 tokens
    settings = Settings(formatter_urls=peer.address, heartbeat_interval=0.05, api_keys_file=str(keys), redis_url=redis_url)
    async with serving(settings) as client:
        t = {"Authorization": "Bearer sk-t"}
        codes = []
        for _ in range(3):
            codes.append((await client.post("/v1/completions", json={"model": "tiny", "prompt": "x"}, headers=t)).status_code)
            # the charge is written in the background: wait for it
            await asyncio.gather(*client.app.state.background)
        assert codes == [200, 200, 429]

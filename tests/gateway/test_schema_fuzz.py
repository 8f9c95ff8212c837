"""Schema-driven fuzzing (schemathesis) of the served gateway: whatever the body, the
answer is never a server error, and every error is OpenAI-shaped."""

from __future__ import annotations

import asyncio
import threading

import pytest
import schemathesis
import uvicorn
from hypothesis import HealthCheck, given, settings

from services.gateway.app import create_app
from shared.config import Settings
from shared.protocol import Delta

from .conftest import FormatterPeer, free_port


def every_choice_says_hello(request) -> list[Delta]:
    """As the formatter answers: one finished Delta per choice (n per prompt)."""
    body = request.body
    prompt = body.get("prompt")
    prompts = len(prompt) if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int) else 1
    return [
        Delta(request.request_id, index=i, content="hello", finish_reason="stop", prompt_tokens=3, completion_tokens=1)
        for i in range(body.get("n", 1) * prompts)
    ]


@pytest.fixture(scope="module")
def served():
    """A gateway and its formatter peer on their own event loop in a thread (the test is sync)."""
    loop = asyncio.new_event_loop()
    port = free_port()
    box = {}

    async def start():
        peer = FormatterPeer(f"tcp://127.0.0.1:{free_port()}")
        peer.respond = every_choice_says_hello
        settings_ = Settings(formatter_urls=peer.address, heartbeat_interval=0.1, port=port, request_timeout=5.0)
        server = uvicorn.Server(uvicorn.Config(create_app(settings_), host="127.0.0.1", port=port, log_level="warning"))
        box.update(peer=peer, server=server, task=asyncio.ensure_future(server.serve()))

    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(start(), loop).result(10)
    url = f"http://127.0.0.1:{port}"
    import httpx

    for _ in range(200):
        try:
            if httpx.get(url + "/ready").status_code == 200:
                break
        except httpx.TransportError:
            pass
        threading.Event().wait(0.05)
    yield url

    async def stop():
        box["server"].should_exit = True
        await box["task"]
        await box["peer"].close()

    asyncio.run_coroutine_threadsafe(stop(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)


# The OpenAPI document the gateway serves, read from the app itself.
SCHEMA = schemathesis.openapi.from_dict(create_app(Settings()).openapi())
OPERATIONS = [("POST", "/v1/chat/completions"), ("POST", "/v1/completions"), ("GET", "/v1/models/{model_id}")]


@pytest.mark.parametrize("method,path", OPERATIONS)
def test_no_server_errors(served, method, path):
    strategy = SCHEMA[path][method].as_strategy()

    @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
    @given(case=strategy)
    def check(case):
        if isinstance(case.body, dict) and "model" in case.body:
            case.body["model"] = "tiny"  # the served model, so bodies get past the 404
        response = case.call(base_url=served)
        assert response.status_code < 500, response.text
        if response.status_code >= 400:
            assert set(response.json()["error"]) == {"message", "type", "param", "code"}

    check()

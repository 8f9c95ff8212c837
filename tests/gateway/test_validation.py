"""Bad requests get OpenAI-shaped errors with the right status, before reaching a formatter."""

import httpx
import pytest

from services.gateway.app import create_app
from shared.config import Settings

pytestmark = pytest.mark.asyncio(loop_scope="module")

CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}


def assert_openai_error(response, status, param=None):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param
    return error


async def test_bad_json_is_400(client, peer):
    r = await client.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert_openai_error(r, 400)
    assert not peer.requests


@pytest.mark.parametrize(
    "body,param",
    [
        ({"model": "tiny"}, "messages"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "model"),
        ({**CHAT, "messages": "hello"}, "messages"),
        ({**CHAT, "temperature": "hot"}, "temperature"),
        ({**CHAT, "temperature": 3.5}, "temperature"),
        ({**CHAT, "n": 0}, "n"),
        ({**CHAT, "max_tokens": -1}, "max_tokens"),
        ({**CHAT, "messages": [{"role": "wizard", "content": "x"}]}, None),
        ({**CHAT, "messages": []}, "messages"),
        ({**CHAT, "tool_choice": {"type": "function", "function": {"name": "absent"}}}, None),
        ({**CHAT, "reasoning_effort": "extreme"}, "reasoning_effort"),
    ],
)
async def test_invalid_chat_bodies_are_400(client, peer, body, param):
    r = await client.post("/v1/chat/completions", json=body)
    error = assert_openai_error(r, 400, param)
    assert error["type"] == "invalid_request_error"
    assert not peer.requests


async def test_invalid_completion_bodies_are_400(client):
    for body in ({"model": "tiny"}, {"model": "tiny", "prompt": []}, {"model": "tiny", "prompt": [[]]}, {"model": "tiny", "prompt": "x", "echo": True}):
        assert_openai_error(await client.post("/v1/completions", json=body), 400)


async def test_unknown_model_is_404(client):
    error = assert_openai_error(await client.post("/v1/chat/completions", json={**CHAT, "model": "gpt-9"}), 404, "model")
    assert error["code"] == "model_not_found"
    assert_openai_error(await client.get("/v1/models/gpt-9"), 404)


async def test_unknown_route_is_404(client):
    assert_openai_error(await client.get("/v1/nothing-here"), 404)
    assert_openai_error(await client.get("/v1/chat/completions"), 405)


async def test_body_too_large_is_413(client, peer):
    big = {**CHAT, "messages": [{"role": "user", "content": "x" * 30_000}]}
    error = assert_openai_error(await client.post("/v1/chat/completions", json=big), 413)
    assert error["code"] == "body_too_large"

    async def chunks():  # no Content-Length: the limit holds as the body streams in
        yield b'{"model": "tiny", "messages": [{"role": "user", "content": "'
        for _ in range(30):
            yield b"x" * 1000
        yield b'"}]}'

    # Straight into the ASGI app: a real socket may reset while the client still uploads.
    app = create_app(Settings(max_body_bytes=20_000))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://gw") as direct:
        r = await direct.post("/v1/chat/completions", content=chunks(), headers={"content-type": "application/json"})
    assert_openai_error(r, 413)
    assert not peer.requests


async def test_integers_beyond_the_wire_are_400(client, peer):
    huge = 2**70
    assert_openai_error(await client.post("/v1/chat/completions", json={**CHAT, "seed": huge}), 400, "seed")
    assert_openai_error(await client.post("/v1/completions", json={"model": "tiny", "prompt": [huge]}), 400)
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "integer", "maximum": huge}}}
    assert_openai_error(await client.post("/v1/chat/completions", json={**CHAT, "tools": [tool]}), 400)
    assert not peer.requests

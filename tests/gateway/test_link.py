"""The gateway with its formatter link over real ZeroMQ sockets: responses, SSE, errors, aborts."""

import asyncio
import json
import time

import httpx
import pytest

from shared.protocol import Delta, ToolCallDelta

from .conftest import hello_deltas

pytestmark = pytest.mark.asyncio(loop_scope="module")

CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}


async def until(check, timeout: float = 2.0) -> None:
    deadline = time.monotonic() + timeout
    while not check() and time.monotonic() < deadline:
        await asyncio.sleep(0.01)


def sse_events(text: str) -> list:
    events = []
    for block in text.strip().split("\n\n"):
        assert block.startswith("data: "), block
        data = block[len("data: "):]
        events.append(data if data == "[DONE]" else json.loads(data))
    return events


async def test_chat_whole_response(client, peer):
    r = await client.post("/v1/chat/completions", json={**CHAT, "n": 2, "max_tokens": 5})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-") and body["model"] == "tiny"
    assert [c["message"]["content"] for c in body["choices"]] == ["Hello", "Hello"]
    assert [c["finish_reason"] for c in body["choices"]] == ["stop", "stop"]
    assert body["usage"] == {
        "prompt_tokens": 7,
        "completion_tokens": 4,
        "total_tokens": 11,
        "prompt_tokens_details": {"cached_tokens": 3},
        "completion_tokens_details": {"reasoning_tokens": 0},
    }
    (sent,) = peer.requests
    assert sent.endpoint == "chat" and sent.body["max_tokens"] == 5 and sent.body["n"] == 2


async def test_chat_stream_chunks(client, peer):
    r = await client.post("/v1/chat/completions", json={**CHAT, "stream": True, "stream_options": {"include_usage": True}})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == "Hello"
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "stop"
    assert all(c["usage"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 2


async def test_reasoning_and_tool_calls_reach_the_client(client, peer):
    def respond(req):
        rid = req.request_id
        return [
            Delta(rid, reasoning_content="Need weather.", prompt_tokens=9, completion_tokens=4, reasoning_tokens=3),
            Delta(rid, tool_calls=[ToolCallDelta(0, "call_x", "get_weather", "")], completion_tokens=12, reasoning_tokens=3),
            Delta(rid, tool_calls=[ToolCallDelta(0, None, None, '{"city":')], completion_tokens=14, reasoning_tokens=3),
            Delta(rid, tool_calls=[ToolCallDelta(0, None, None, '"Paris"}')], finish_reason="tool_calls", completion_tokens=16, reasoning_tokens=3),
        ]

    peer.respond = respond
    body = (await client.post("/v1/chat/completions", json=CHAT)).json()
    message = body["choices"][0]["message"]
    assert message["reasoning_content"] == "Need weather." and message["content"] is None
    assert message["tool_calls"] == [{"id": "call_x", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}]
    assert body["choices"][0]["finish_reason"] == "tool_calls"
    assert body["usage"]["completion_tokens_details"]["reasoning_tokens"] == 3

    events = sse_events((await client.post("/v1/chat/completions", json={**CHAT, "stream": True})).text)
    deltas = [e["choices"][0]["delta"] for e in events[:-1]]
    assert {"reasoning_content": "Need weather."} in deltas
    calls = [d["tool_calls"][0] for d in deltas if "tool_calls" in d]
    assert calls[0] == {"index": 0, "id": "call_x", "type": "function", "function": {"name": "get_weather", "arguments": ""}}
    assert "".join(c["function"]["arguments"] for c in calls) == '{"city":"Paris"}'


async def test_early_error_keeps_its_status_even_for_streams(client, peer):
    peer.respond = lambda req: [Delta(req.request_id, error="the queue is full", status=429, finish_reason="error")]
    for stream in (False, True):
        r = await client.post("/v1/chat/completions", json={**CHAT, "stream": stream})
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["type"] == "rate_limit_error" and "queue is full" in r.json()["error"]["message"]
    peer.respond = lambda req: [Delta(req.request_id, error="prompt is too long", status=400, finish_reason="error")]
    r = await client.post("/v1/completions", json={"model": "tiny", "prompt": "x", "stream": True})
    assert r.status_code == 400 and "too long" in r.json()["error"]["message"]


async def test_error_after_headers_is_an_sse_error_event(client, peer):
    peer.respond = lambda req: [
        Delta(req.request_id, content="par", completion_tokens=1),
        Delta(req.request_id, error="worker died", status=503, finish_reason="error"),
    ]
    r = await client.post("/v1/chat/completions", json={**CHAT, "stream": True})
    assert r.status_code == 200
    events = sse_events(r.text)
    assert events[-1] == "[DONE]" and events[-2]["error"]["message"] == "worker died"
    assert events[1]["choices"][0]["delta"]["content"] == "par"


async def test_client_disconnect_sends_abort(client, peer, gateway):
    peer.respond = lambda req: [Delta(req.request_id, content="first", completion_tokens=1)]  # then silence
    async with httpx.AsyncClient(base_url=gateway, timeout=10) as c:
        async with c.stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True}) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if "first" in line:
                    break
    await until(lambda: peer.aborts)
    assert [a.request_id for a in peer.aborts] == [peer.requests[-1].request_id]


async def test_request_timeout_aborts(client, peer):
    peer.respond = lambda req: None  # the formatter takes it and never answers
    r = await client.post("/v1/chat/completions", json=CHAT)  # request_timeout is 1 s here
    assert r.status_code == 504 and r.json()["error"]["type"] == "timeout_error"
    await until(lambda: peer.aborts)  # the Abort frame may still be on its way
    assert [a.request_id for a in peer.aborts] == [peer.requests[-1].request_id]


async def test_silent_formatter_fails_its_requests_and_not_ready(client, peer):
    peer.respond = lambda req: [Delta(req.request_id, content="x", completion_tokens=1)]
    task = asyncio.create_task(client.post("/v1/chat/completions", json=CHAT))
    await asyncio.sleep(0.2)
    peer.answer_pings = False  # now silent past heartbeat_timeout (0.5 s)
    r = await task
    assert r.status_code == 503 and "formatter" in r.json()["error"]["message"]
    r = await client.get("/ready")
    assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready"
    assert (await client.post("/v1/chat/completions", json=CHAT)).status_code == 503
    peer.answer_pings, peer.respond = True, hello_deltas
    for _ in range(100):
        if (await client.get("/ready")).status_code == 200:
            break
        await asyncio.sleep(0.02)
    assert (await client.post("/v1/chat/completions", json=CHAT)).status_code == 200


async def test_models_health_metrics(client):
    models = (await client.get("/v1/models")).json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["tiny"]
    assert (await client.get("/v1/models/tiny")).json()["id"] == "tiny"
    assert (await client.get("/health")).json() == {"status": "ok"}
    assert (await client.get("/version")).json()["version"]
    await client.post("/v1/completions", json={"model": "tiny", "prompt": "x"})
    assert (await client.post("/v1/completions", json={"model": "tiny"})).status_code == 400
    text = (await client.get("/metrics")).text
    assert 'rose_gateway_requests_total{endpoint="completion",status="200"}' in text
    assert "rose_gateway_time_to_first_token_seconds_bucket" in text
    assert "rose_gateway_requests_in_flight 0.0" in text
    assert "rose_gateway_formatters_live 1.0" in text
    assert 'rose_gateway_rejected_requests_total{status="400"}' in text


async def test_client_leaving_before_the_first_token_aborts(peer, gateway):
    peer.respond = lambda req: None  # queued: nothing comes back
    before = len(peer.aborts)
    started = time.monotonic()
    async with httpx.AsyncClient(base_url=gateway, timeout=0.3) as c:
        with pytest.raises(httpx.ReadTimeout):
            await c.post("/v1/chat/completions", json={**CHAT, "stream": True})
    while len(peer.aborts) == before and time.monotonic() - started < 2:
        await asyncio.sleep(0.01)
    assert peer.aborts[-1].request_id == peer.requests[-1].request_id
    assert time.monotonic() - started < 0.9  # noticed the client, not the 1 s request timeout


async def test_caller_trace_context_is_continued(client, peer):
    parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    assert (await client.post("/v1/chat/completions", json=CHAT, headers={"traceparent": parent})).status_code == 200
    carried = peer.requests[-1].trace
    # the services below join the caller's trace (same trace id)
    assert carried["traceparent"].split("-")[1] == "4bf92f3577b34da6a3ce929d0e0e4736"


async def test_a_choice_beyond_n_is_a_gateway_error(client, peer):
    peer.respond = lambda req: [Delta(req.request_id, index=3, content="x", finish_reason="stop")]
    r = await client.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 502 and r.json()["error"]["type"] == "server_error"

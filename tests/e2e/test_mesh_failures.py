"""SIGKILL a worker or a formatter while 20 streams run: every stream ends (completed or
with an error event), none hangs, and the mesh goes on serving new requests."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="module")]

STREAMS = 20
STREAM_TIMEOUT_S = 60.0


@pytest.fixture(scope="module")
def mesh2(mesh):
    return mesh(formatters=2, workers=2)


async def read_stream(http: httpx.AsyncClient, index: int, started: asyncio.Event, counter: list[int]) -> str:
    """'completed', 'error', or 'truncated' (the stream ended without either: a bug)."""
    body = {
        "model": "gpt-oss-tiny",
        "prompt": [1000 + index, 2000 + index, 3000 + index, 4000 + index],
        "max_tokens": 80,
        "stream": True,
        "ignore_eos": True,
    }
    try:
        async with http.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                await response.aread()
                return "error"
            finished = False
            first = True
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                payload = line[len("data: "):]
                if payload == "[DONE]":
                    return "completed" if finished else "truncated"
                chunk = json.loads(payload)
                if "error" in chunk:
                    return "error"
                if first:
                    first = False
                    counter[0] += 1
                    if counter[0] == STREAMS:
                        started.set()
                if any(c.get("finish_reason") for c in chunk.get("choices", [])):
                    finished = True
            return "truncated"
    except httpx.TransportError:
        return "truncated"


async def run_streams_and_kill(mesh, victim: str) -> list[str]:
    started = asyncio.Event()
    counter = [0]
    async with httpx.AsyncClient(base_url=mesh.url, timeout=STREAM_TIMEOUT_S, limits=httpx.Limits(max_connections=64)) as http:
        tasks = [asyncio.create_task(asyncio.wait_for(read_stream(http, i, started, counter), STREAM_TIMEOUT_S)) for i in range(STREAMS)]
        await asyncio.wait_for(started.wait(), 30)  # every stream has its first token
        await asyncio.to_thread(mesh.kill, victim)
        t0 = time.monotonic()
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        elapsed = time.monotonic() - t0
    hung = [o for o in outcomes if isinstance(o, BaseException)]
    assert not hung, f"{len(hung)} streams hung past {STREAM_TIMEOUT_S}s: {hung[:3]}"
    assert elapsed < STREAM_TIMEOUT_S
    return outcomes


async def assert_still_serving(mesh) -> None:
    async with httpx.AsyncClient(base_url=mesh.url, timeout=30) as http:
        replies = await asyncio.gather(*(
            http.post("/v1/completions", json={"model": "gpt-oss-tiny", "prompt": [500 + i, 600], "max_tokens": 4})
            for i in range(6)
        ))
    assert [r.status_code for r in replies] == [200] * 6, [r.text for r in replies if r.status_code != 200]
    assert all(r.json()["usage"]["completion_tokens"] >= 1 for r in replies)


async def test_killing_a_worker_ends_or_reruns_every_stream(mesh2):
    outcomes = await run_streams_and_kill(mesh2, "worker-1")
    assert "truncated" not in outcomes, outcomes
    # streams on the live worker finish; those on the dead one had tokens out, so they end with an error
    assert outcomes.count("completed") >= 1 and outcomes.count("error") >= 1, outcomes
    await assert_still_serving(mesh2)


async def test_killing_a_formatter_ends_every_stream(mesh2):
    outcomes = await run_streams_and_kill(mesh2, "formatter-1")
    assert "truncated" not in outcomes, outcomes
    assert outcomes.count("completed") >= 1 and outcomes.count("error") >= 1, outcomes
    await assert_still_serving(mesh2)

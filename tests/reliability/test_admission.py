"""What a mesh lets in, against real processes: overload, input limits, fuzzing.

One small mesh (1 worker of 2 sequences, a scheduler queue of 1, the gateway's
ROSE_MAX_INFLIGHT of 4, tight input limits):

- 10x its capacity in concurrent streams for a few seconds: refusals are 429 and
  quick, every accepted stream completes, no service's memory grows.
- a full scheduler queue answers 429 with Retry-After while the running streams go on.
- every input limit answers 400 (413 for the body) naming the field.
- schemathesis against the served OpenAPI schema, bounded: no 5xx, no service down.
"""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from bench.overload import overload, service_rss

from .harness import MODEL, assert_serving, stream_body, streams_with_event

pytestmark = [pytest.mark.e2e]

CAPACITY = 4  # the gateway's in-flight limit; the scheduler holds 2 running + 1 queued
# max_tokens' limit: long enough that two running streams outlast the full-queue scene (at 16 a
# cold mesh finished them before its probe: the probe was served, not refused)
MAX_TOKENS = 64
LIMITS = {
    "ROSE_MAX_NUM_SEQS": "2",
    "ROSE_MAX_QUEUE": "1",
    "ROSE_MAX_INFLIGHT": str(CAPACITY),
    "ROSE_MAX_MODEL_LEN": "256",
    "ROSE_MAX_MESSAGES": "8",
    "ROSE_MAX_N": "2",
    "ROSE_MAX_STOP_STRINGS": "4",
    "ROSE_MAX_STOP_STRING_CHARS": "32",
    "ROSE_MAX_TOOLS": "4",
    "ROSE_MAX_TOOLS_BYTES": "2048",
    "ROSE_MAX_TOKENS_LIMIT": str(MAX_TOKENS),
    "ROSE_MAX_BODY_BYTES": "65536",
}


@pytest.fixture(scope="module")
def small(mesh):
    return mesh(formatters=1, workers=1, env=LIMITS)


def test_ten_times_capacity(small):
    asyncio.run(overload(small.url, 2, 0.5, 2))  # warm: first requests allocate what serving needs
    before = service_rss(small)
    figures = asyncio.run(overload(small.url, 10 * CAPACITY, 5.0, 8))
    after = service_rss(small)
    refusals = figures["refusals"]
    assert set(refusals) == {"429"}, figures
    assert refusals["429"]["count"] > 100, figures
    # p99 is 50-100 ms on an idle 2-core machine (docs/RELIABILITY.md); the bound here
    # leaves room for other test suites sharing the cores.
    assert refusals["429"]["p50_ms"] < 50, figures
    assert refusals["429"]["p99_ms"] < 1000, figures
    accepted = figures["accepted"]
    assert accepted["started"] >= 2 and accepted["completed"] == accepted["started"] and accepted["failed"] == 0, figures
    grown = {name: after[name] - before[name] for name in before}
    assert all(mib < 32 for mib in grown.values()), grown


@pytest.mark.asyncio(loop_scope="module")
async def test_full_queue_refuses_while_running_streams_go_on(small):
    seen = {}

    async def refuse():
        # 2 running + 1 queued: the scheduler's queue is full; the gateway (limit 4) lets one more through
        async with httpx.AsyncClient(base_url=small.url, timeout=10) as http:
            sent = time.monotonic()
            reply = await http.post("/v1/completions", json={"model": MODEL, "prompt": [9, 9, 9], "max_tokens": 2})
            seen.update(status=reply.status_code, seconds=time.monotonic() - sent, retry=reply.headers.get("retry-after"),
                        code=reply.json().get("error", {}).get("code"))

    async def queued_then_refuse():
        async with httpx.AsyncClient(base_url=small.url, timeout=60) as http:
            queued = asyncio.create_task(http.post("/v1/completions", json={**stream_body(90, 4), "stream": False}))
            await asyncio.sleep(0.1)  # it reaches the queue; the two streams have ~60 tokens to go
            await refuse()
            if seen["status"] == 429:
                assert not queued.done(), "the queued request ran before the probe: the queue was not full"
            assert (await queued).status_code == 200

    # The scene is timing: on a loaded 2-core box the queued request can still miss the queue
    # within 0.1 s, and the probe is then rightly served. Such a miss sets nothing up; it is
    # played again, and a refusal must come within three plays.
    for _ in range(3):
        outcomes = await streams_with_event(small.url, 2, MAX_TOKENS, queued_then_refuse)
        assert outcomes == ["completed", "completed"]
        if seen["status"] == 429:
            break
        assert seen["status"] == 200, seen
    assert seen["status"] == 429 and seen["retry"] == "1" and seen["code"] == "overloaded", seen
    assert seen["seconds"] < 1.0, seen


def chat(**extra) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **extra}


def tool(name: str, description: str = "") -> dict:
    return {"type": "function", "function": {"name": name, "description": description, "parameters": {"type": "object"}}}


LIMIT_CASES = [
    ("messages", chat(messages=[{"role": "user", "content": "hi"}] * 9), 400, "messages"),
    ("n", chat(n=3), 400, "n"),
    ("prompts x n", {"model": MODEL, "prompt": ["a", "b", "c"], "max_tokens": 2}, 400, "prompt"),
    ("stop strings", chat(stop=["a", "b", "c", "d", "e"]), 400, "stop"),
    ("stop length", chat(stop="x" * 33), 400, "stop"),
    ("max_tokens", chat(max_tokens=MAX_TOKENS + 1), 400, "max_tokens"),
    ("max_completion_tokens", chat(max_tokens=None, max_completion_tokens=MAX_TOKENS + 1), 400,
     "max_completion_tokens"),
    ("tools count", chat(tools=[tool(f"f{i}") for i in range(5)]), 400, "tools"),
    ("tools size", chat(tools=[tool("f", "x" * 3000)]), 400, "tools"),
    ("body size", chat(messages=[{"role": "user", "content": "x" * 70000}]), 413, None),
    ("prompt vs context", {"model": MODEL, "prompt": list(range(1, 300)), "max_tokens": 2}, 400, None),
    ("prompt + max_tokens vs context", {"model": MODEL, "prompt": list(range(1, 250)), "max_tokens": MAX_TOKENS}, 400, None),
]


@pytest.mark.parametrize("name,body,status,param", LIMIT_CASES, ids=[c[0] for c in LIMIT_CASES])
def test_input_limits(small, name, body, status, param):
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    reply = httpx.post(small.url + path, json={k: v for k, v in body.items() if v is not None}, timeout=30)
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert error["param"] == param, error
    if param:
        assert param.split(".")[0] in error["message"], error
    elif status == 400:
        assert "context" in error["message"], error


def test_default_max_tokens_is_the_limit(small):
    reply = httpx.post(small.url + "/v1/completions", json={"model": MODEL, "prompt": [5, 6, 7], "ignore_eos": True}, timeout=60)
    assert reply.status_code == 200, reply.text
    assert reply.json()["usage"]["completion_tokens"] == MAX_TOKENS


OPERATIONS = [("POST", "/v1/chat/completions"), ("POST", "/v1/completions"), ("GET", "/v1/models/{model_id}")]


@pytest.mark.parametrize("method,path", OPERATIONS)
def test_fuzz_the_running_gateway(small, method, path):
    schema = schemathesis.openapi.from_url(small.url + "/openapi.json")
    strategy = schema[path][method].as_strategy()

    @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(case=strategy)
    def check(case):
        if isinstance(case.body, dict) and "model" in case.body:
            case.body["model"] = MODEL  # the served model, so bodies get past the 404
        response = case.call(base_url=small.url, timeout=60)
        assert response.status_code < 500, response.text
        if response.status_code >= 400:
            assert set(response.json()["error"]) == {"message", "type", "param", "code"}

    check()
    assert not small.crashed(), [small.describe_crash(c) for c in small.crashed()]
    asyncio.run(assert_serving(small.url, requests=2))

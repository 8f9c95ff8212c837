"""Two formatters, two workers: load spreads, a repeated prefix returns to its worker,
and a client that goes away frees its KV blocks at once.

Worker counters come from the Redis hash the scheduler keeps per worker
(`rose:worker:<id>`, refreshed on every heartbeat); the prefix index is read from
Redis directly (`rose:kv:<block hash>` -> worker ids).
"""

from __future__ import annotations

import asyncio
import time

import httpx
import openai
import pytest
import redis

from shared.block_hash import prefix_hashes

pytestmark = pytest.mark.e2e

WORKERS = ("worker-0", "worker-1")
BLOCK = 16


@pytest.fixture(scope="module")
def mesh2(mesh):
    return mesh(formatters=2, workers=2, env={"ROSE_BLOCK_SIZE": str(BLOCK), "ROSE_MAX_MODEL_LEN": "4096"})


@pytest.fixture(scope="module")
def store(mesh2):
    client = redis.Redis.from_url(mesh2.redis_url, decode_responses=True)
    yield client
    client.close()


def stats(store, worker_id: str) -> dict[str, int]:
    raw = store.hgetall(f"rose:worker:{worker_id}")
    return {k: int(v) for k, v in raw.items() if k != "model"}


def wait_until(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@pytest.mark.asyncio(loop_scope="module")
async def test_requests_spread_over_both_workers(mesh2, store):
    before = {w: stats(store, w).get("finished", 0) for w in WORKERS}
    client = openai.AsyncOpenAI(base_url=mesh2.base_url, api_key="none", max_retries=0)
    replies = await asyncio.gather(*(
        client.completions.create(model="gpt-oss-tiny", prompt=list(range(3000 + 40 * i, 3040 + 40 * i)), max_tokens=24,
                                  extra_body={"ignore_eos": True})
        for i in range(8)
    ))
    await client.close()
    assert all(r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 24 for r in replies)
    after = wait_until(
        lambda: (lambda s: s if sum(s[w] - before[w] for w in WORKERS) >= 8 else None)(
            {w: stats(store, w).get("finished", 0) for w in WORKERS}),
        3.0, "both workers' finished counters")
    served = {w: after[w] - before[w] for w in WORKERS}
    assert all(n >= 1 for n in served.values()), f"one worker took everything: {served}"


def test_a_repeated_prefix_returns_to_the_worker_that_holds_it(mesh2, store):
    client = openai.OpenAI(base_url=mesh2.base_url, api_key="none", max_retries=0)
    prompt = [(7919 * i) % 150000 + 1000 for i in range(20 * BLOCK + 5)]  # 20 full blocks
    hashes = prefix_hashes(prompt, BLOCK)
    before = {w: stats(store, w) for w in WORKERS}
    client.completions.create(model="gpt-oss-tiny", prompt=prompt, max_tokens=2)

    def holder():
        owners = store.smembers(f"rose:kv:{hashes[18]}")
        return next(iter(owners)) if len(owners) == 1 else None

    owner = wait_until(holder, 3.0, "the prompt's blocks in the Redis index")
    other = next(w for w in WORKERS if w != owner)
    assert all(store.sismember(f"rose:kv:{h}", owner) for h in hashes[:19])
    assert store.sismember(f"rose:kvw:{owner}", str(hashes[0]))
    first = wait_until(lambda: (lambda s: s if s["finished"] > before[owner].get("finished", 0) else None)(stats(store, owner)), 3.0, "counters")
    assert first["prefill_tokens"] - before[owner].get("prefill_tokens", 0) >= len(prompt) - BLOCK

    for round_ in range(3):
        mark_owner, mark_other = stats(store, owner), stats(store, other)
        reply = client.completions.create(model="gpt-oss-tiny", prompt=prompt, max_tokens=2)
        assert reply.usage.prompt_tokens == len(prompt)
        now = wait_until(lambda: (lambda s: s if s["finished"] > mark_owner["finished"] else None)(stats(store, owner)),
                         3.0, f"round {round_} on {owner}")
        # served from the cache there: 19 blocks cached, only the tail computed
        assert now["cached_tokens"] - mark_owner["cached_tokens"] >= 19 * BLOCK
        assert now["prefill_tokens"] - mark_owner["prefill_tokens"] <= 2 * BLOCK
        assert stats(store, other)["prefill_tokens"] == mark_other["prefill_tokens"]
    client.close()


@pytest.mark.asyncio(loop_scope="module")
async def test_client_disconnect_frees_kv_blocks_within_a_second(mesh2, store):
    body = {"model": "gpt-oss-tiny", "prompt": list(range(5000, 5300)), "max_tokens": 3000, "stream": True, "ignore_eos": True}
    async with httpx.AsyncClient(base_url=mesh2.url, timeout=30) as http:
        async with http.stream("POST", "/v1/completions", json=body) as response:
            assert response.status_code == 200
            chunks = 0
            async for line in response.aiter_lines():
                if line.startswith("data: {"):
                    chunks += 1
                    if chunks == 3:
                        break
            # blocks are held while the request streams
            busy = wait_until(lambda: [w for w in WORKERS if stats(store, w)["free_blocks"] < stats(store, w)["total_blocks"]],
                              2.0, "a worker holding blocks")
            assert len(busy) == 1
            left_at = time.monotonic()
        # leaving the `stream` block closes the connection mid-stream
    worker = busy[0]
    wait_until(lambda: (lambda s: s["free_blocks"] == s["total_blocks"] and s["running"] == 0)(stats(store, worker)),
               1.0, f"{worker} to free every block after the client left")
    assert time.monotonic() - left_at < 1.0

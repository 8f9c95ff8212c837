"""Helpers for the reliability tests: streams that report how they ended, worker
counters from Redis, and restarting one child of a mesh.

Worker counters come from the Redis hash the scheduler refreshes on every heartbeat
(`rose:worker:<id>`: running, free_blocks, total_blocks, finished, aborted, ...).
"""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import redis

from services.launcher import Child, Mesh, ensure_redis_server, port_of, redis_answers

MODEL = "gpt-oss-tiny"


def stream_body(index: int, max_tokens: int) -> dict:
    """A streamed completion with its own prompt (no prefix sharing), run to max_tokens."""
    return {
        "model": MODEL,
        "prompt": [1000 + index, 2000 + index, 3000 + index, 4000 + index],
        "max_tokens": max_tokens,
        "stream": True,
        "ignore_eos": True,
    }


async def read_stream(http: httpx.AsyncClient, body: dict, on_first=None) -> str:
    """How one stream ended: 'completed', 'error' (an error event or status), or else what went wrong (a bug)."""
    try:
        async with http.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                await response.aread()
                return f"error {response.status_code}"
            finished, first = False, True
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                payload = line[len("data: "):]
                if payload == "[DONE]":
                    return "completed" if finished else "truncated"
                try:
                    chunk = json.loads(payload)
                except ValueError:
                    return f"garbled event: {payload[:80]!r}"
                if "error" in chunk:
                    return "error"
                if first and on_first is not None:
                    first = False
                    on_first()
                if any(c.get("finish_reason") for c in chunk.get("choices", [])):
                    finished = True
            return "truncated"
    except httpx.TransportError as exc:
        return f"truncated ({type(exc).__name__})"


async def streams_with_event(url: str, count: int, max_tokens: int, event, timeout: float = 90.0) -> list[str]:
    """Start `count` streams; once every one has its first token, await `event()`; every outcome."""
    all_started = asyncio.Event()
    started = [0]

    def on_first():
        started[0] += 1
        if started[0] == count:
            all_started.set()

    limits = httpx.Limits(max_connections=count + 8, max_keepalive_connections=count + 8)
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as http:
        tasks = [
            asyncio.create_task(asyncio.wait_for(read_stream(http, stream_body(i, max_tokens), on_first), timeout))
            for i in range(count)
        ]
        await asyncio.wait_for(all_started.wait(), 60)
        await event()
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
    hung = [o for o in outcomes if isinstance(o, BaseException)]
    assert not hung, f"{len(hung)} of {count} streams hung past {timeout}s: {hung[:3]!r}"
    return outcomes


async def assert_serving(url: str, requests: int = 6) -> None:
    """New requests are answered in full."""
    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        replies = await asyncio.gather(*(
            http.post("/v1/completions", json={"model": MODEL, "prompt": [500 + i, 600], "max_tokens": 4, "ignore_eos": True})
            for i in range(requests)
        ))
    assert [r.status_code for r in replies] == [200] * requests, [r.text for r in replies if r.status_code != 200]
    assert all(r.json()["usage"]["completion_tokens"] == 4 for r in replies)


def worker_stats(store: redis.Redis, worker_id: str) -> dict[str, int]:
    raw = store.hgetall(f"rose:worker:{worker_id}")
    return {k: int(v) for k, v in raw.items() if k != "model"}


def wait_until(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def kv_all_free(store: redis.Redis, worker_ids) -> dict[str, dict[str, int]]:
    """Every worker's counters once nothing runs and every KV block is free (AssertionError after 15 s)."""

    def check():
        stats = {w: worker_stats(store, w) for w in worker_ids}
        ok = all(s and s["running"] == 0 and s["waiting"] == 0 and s["free_blocks"] == s["total_blocks"] for s in stats.values())
        return stats if ok else None

    try:
        return wait_until(check, 15.0, "every KV block free")
    except AssertionError:
        raise AssertionError(f"KV blocks not all free: {({w: worker_stats(store, w) for w in worker_ids})}") from None


def restart(mesh: Mesh, name: str) -> Child:
    """Start a child of the mesh again under its name (after it was killed or stopped)."""
    old = mesh.child(name)
    if old.returncode is None:
        raise RuntimeError(f"{name} is still running")
    mesh.children.remove(old)
    if old.role == "redis":
        port = port_of(mesh.redis_url)
        argv = [ensure_redis_server(), "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--loglevel", "warning"]
        child = mesh.spawn(name, "redis", {}, argv)
        wait_until(lambda: redis_answers("127.0.0.1", port), 15.0, "redis-server to answer")
        return child
    overrides = {}
    if old.role == "worker":
        overrides["ROSE_WORKER_ID"] = name
    elif old.role == "formatter":
        overrides["ROSE_FORMATTER_BIND"] = mesh.formatter_binds()[int(name.rsplit("-", 1)[1])]
    return mesh.spawn(name, old.role, overrides)


def ready_workers(url: str) -> int:
    """Workers the gateway's /ready reports (0 when not ready)."""
    try:
        response = httpx.get(url + "/ready", timeout=2)
    except httpx.TransportError:
        return 0
    return response.json().get("workers", 0) if response.status_code == 200 else 0

"""Overload: 10x more concurrent streams than the mesh can hold, for a fixed time.

    python -m bench.overload [--duration 30] [--factor 10] [--max-num-seqs 4] [--max-queue 4]

Starts a mesh on loopback (private redis, 1 formatter, 1 worker, the tiny
checkpoint) whose capacity is max_num_seqs running + max_queue queued requests,
the gateway's ROSE_MAX_INFLIGHT set to the same, then runs factor x capacity
clients for --duration seconds. Each client streams a completion; a refusal
(429/503) is timed from send to status and the client tries again after a random
pause in --retry-pause (shorter than the Retry-After of 1 s real clients honour,
to keep the pressure on); an accepted stream is read to its end. It prints, as JSON:

- refusals: count and time-to-status p50/p99/max (ms), by status
- accepted: started, completed (a finish_reason then [DONE]), failed (anything else)
- rss_mib: each service's resident memory before the load, right after, and after
  a second load of the same length (flat memory: the second run adds ~nothing)

Loopback only; it stops by itself after the runs (plus the accepted streams' end).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import random
import sys
import tempfile
import time
from dataclasses import dataclass, field

from urllib.parse import urlsplit

from shared.config import Settings

STREAM_TIMEOUT_S = 120.0


@dataclass
class Figures:
    refusal_ms: dict[int, list[float]] = field(default_factory=dict)
    started: int = 0
    completed: int = 0
    failed: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        refusals = {}
        for status, times in sorted(self.refusal_ms.items()):
            ordered = sorted(times)
            refusals[str(status)] = {
                "count": len(ordered),
                "p50_ms": round(_pct(ordered, 50), 2),
                "p99_ms": round(_pct(ordered, 99), 2),
                "max_ms": round(ordered[-1], 2),
            }
        return {
            "refusals": refusals,
            "accepted": {"started": self.started, "completed": self.completed, "failed": len(self.failed)},
            "failures": self.failed[:5],
        }


def _pct(ordered: list[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))] if ordered else float("nan")


class Connection:
    """One keep-alive HTTP/1.1 connection to the gateway.

    A bare asyncio client: with ~100 connections httpx's pool spends more CPU than
    the gateway does, and on a two-core machine that skews every figure.
    """

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: dict) -> tuple[int, dict[str, str]]:
        """Send a JSON POST; (status, headers) once the response head is in."""
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        data = json.dumps(body).encode()
        head = (f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(data)}\r\n\r\n")
        self.writer.write(head.encode() + data)
        await self.writer.drain()
        lines = (await self.reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
        return int(lines[0].split()[1]), headers

    async def body(self, headers: dict[str, str]):
        """The response body, piece by piece (Content-Length or chunked)."""
        if "content-length" in headers:
            yield await self.reader.readexactly(int(headers["content-length"]))
        else:
            while True:
                size = int((await self.reader.readline()).strip(), 16)
                chunk = await self.reader.readexactly(size + 2)
                if size == 0:
                    break
                yield chunk[:-2]
        if headers.get("connection", "").lower() == "close":
            self.close()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


async def _client(host: str, port: int, index: int, end: float, max_tokens: int, pause: tuple[float, float],
                  figures: Figures) -> None:
    rng = random.Random(index)
    conn = Connection(host, port)
    attempt = 0
    try:
        while time.monotonic() < end:
            attempt += 1
            body = {
                "model": "gpt-oss-tiny",
                "prompt": [1000 + index, 2000 + attempt % 1000, 3000 + rng.randrange(1000)],
                "max_tokens": max_tokens,
                "stream": True,
                "ignore_eos": True,
            }
            sent = time.perf_counter()
            try:
                status, headers = await asyncio.wait_for(conn.post("/v1/completions", body), STREAM_TIMEOUT_S)
                if status != 200:
                    elapsed_ms = 1000 * (time.perf_counter() - sent)
                    text = b"".join([piece async for piece in conn.body(headers)])
                    if status in (429, 503):
                        figures.refusal_ms.setdefault(status, []).append(elapsed_ms)
                    else:
                        figures.failed.append(f"status {status}: {text[:200]!r}")
                    await asyncio.sleep(rng.uniform(*pause))
                    continue
                figures.started += 1
                stream = b"".join([piece async for piece in conn.body(headers)]).decode()
            except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError, ValueError) as exc:
                figures.failed.append(f"{type(exc).__name__}: {exc}")
                conn.close()
                continue
            events = [line[6:] for line in stream.split("\n") if line.startswith("data: ")]
            finished = any(
                c.get("finish_reason") for e in events if e != "[DONE]" for c in json.loads(e).get("choices", [])
            )
            if finished and events and events[-1] == "[DONE]":
                figures.completed += 1
            else:
                figures.failed.append(f"stream ended without finishing: {events[-2:]}")
    finally:
        conn.close()


async def overload(url: str, clients: int, duration_s: float, max_tokens: int, pause: tuple[float, float] = (0.1, 0.3)) -> dict:
    """Run `clients` looping clients against the gateway at `url` for duration_s; the figures.

    pause: (min, max) seconds a refused client waits before it tries again.
    """
    parts = urlsplit(url)
    if parts.hostname not in ("127.0.0.1", "localhost", "::1"):
        raise ValueError(f"the overload benchmark runs against loopback only, not {url}")
    figures = Figures()
    end = time.monotonic() + duration_s
    await asyncio.gather(*(_client(parts.hostname, parts.port, i, end, max_tokens, pause, figures) for i in range(clients)))
    return figures.summary()


def rss_mib(pid: int) -> float:
    """Resident memory of a process, MiB (0 when it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def service_rss(mesh) -> dict[str, float]:
    return {c.name: round(rss_mib(c.process.pid), 1) for c in mesh.children if c.returncode is None}


def run(mesh, clients: int, duration_s: float, max_tokens: int, pause: tuple[float, float] = (0.1, 0.3)) -> dict:
    """Warm up, then two overload runs; the figures of the first, RSS before/after each."""
    asyncio.run(overload(mesh.url, 2, 1.0, 2))  # first requests allocate what serving needs
    before = service_rss(mesh)
    first = asyncio.run(overload(mesh.url, clients, duration_s, max_tokens, pause))
    after_first = service_rss(mesh)
    second = asyncio.run(overload(mesh.url, clients, duration_s, max_tokens, pause))
    time.sleep(1.0)
    after_second = service_rss(mesh)
    return {
        "clients": clients,
        "duration_s": duration_s,
        "max_tokens": max_tokens,
        "retry_pause_s": list(pause),
        "first_run": first,
        "second_run": second,
        "rss_mib": {name: {"before": before[name], "after_first": after_first.get(name, 0.0), "after_second": after_second.get(name, 0.0)}
                    for name in before},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of each overload run")
    parser.add_argument("--factor", type=int, default=10, help="clients per unit of capacity")
    parser.add_argument("--max-num-seqs", type=int, default=4, help="sequences the worker runs at once")
    parser.add_argument("--max-queue", type=int, default=4, help="requests the scheduler queues")
    parser.add_argument("--max-tokens", type=int, default=16, help="tokens per accepted stream")
    parser.add_argument("--retry-pause", default="0.1,0.3", help="min,max seconds a refused client waits")
    parser.add_argument("--home", default=None, help="rose home (default: a temporary folder)")
    args = parser.parse_args(argv)
    pause = tuple(float(x) for x in args.retry_pause.split(","))
    # Two cores shared by every process: torch's thread per core would starve the services.
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    from services.launcher import Mesh, with_free_ports
    from services.setup import setup

    home = args.home or tempfile.mkdtemp(prefix="rose-overload-")
    settings = dataclasses.replace(
        Settings.from_env(), home=home, max_num_seqs=args.max_num_seqs, max_queue=args.max_queue, max_model_len=1024,
        log_level="warning",
    )
    setup(settings)
    capacity = args.max_num_seqs + args.max_queue
    settings = dataclasses.replace(settings, max_inflight=capacity)
    mesh = Mesh(with_free_ports(settings), formatters=1, workers=1, log_dir=f"{home}/logs")
    print(f"mesh: starting (logs in {home}/logs); capacity {capacity}, {args.factor * capacity} clients", file=sys.stderr)
    try:
        mesh.start(300)
        report = run(mesh, args.factor * capacity, args.duration, args.max_tokens, pause)
    finally:
        mesh.stop()
    report["capacity"] = {"max_num_seqs": args.max_num_seqs, "max_queue": args.max_queue, "max_inflight": capacity, "workers": 1}
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What each hop of the mesh costs per token, without the engine in the way.

One real service process at a time (`rose scheduler`, `rose formatter`, `rose
gateway`) between two load peers in this process that speak its protocol: the
upstream peer streams tokens for N requests in rounds (one token per request per
round, like an engine step, paced at --step-ms), the downstream peer timestamps
each token as it comes out. Per hop and concurrency it reports offered and
delivered tokens/s, the per-token latency through the hop (p50/p99) and the
inter-token latency the receiver sees (p50/p99; the source's is --step-ms), then
the same with no pacing (the hop's capacity). The `mesh` hop is the scheduler,
formatter and gateway together, with this process in the worker's place.

    python -m bench.mesh_hops [--concurrency 1,16,64] [--rounds 200] [--step-ms 10] [--prompt-tokens 2]

The mesh hop also times admission: from a burst of N requests posted at once (prompts of
--prompt-tokens distinct token ids) to each one's Submit reaching the worker peer, the first,
p50 and last (what the gateway, formatter and scheduler cost a request, one after another).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import sys
import tempfile
import time
from dataclasses import dataclass, field

import zmq
import zmq.asyncio

from bench.streaming import post_sse
from services.launcher import Mesh, with_free_ports
from shared import protocol
from shared.config import Settings
from shared.protocol import (
    Delta,
    GenerateRequest,
    Heartbeat,
    Ping,
    Pong,
    Register,
    SamplingParams,
    Submit,
    TokenEvent,
)

MODEL = "gpt-oss-tiny"
TOKEN = 1000  # an ordinary text token of o200k


@dataclass
class HopRun:
    offered: float  # tokens/s the source aimed at (0: unpaced)
    sent_at: dict[tuple[str, int], float] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)
    first_send: float = 0.0
    last_recv: float = 0.0
    arrivals: dict[str, list[tuple[float, int]]] = field(default_factory=dict)  # per stream: (time, tokens)
    admission: list[float] = field(default_factory=list)  # mesh hop: burst start -> each Submit at the worker (s)

    def received(self, stream: str, index: int) -> None:
        now = time.perf_counter()
        sent = self.sent_at.get((stream, index))
        if sent is not None:
            self.latencies.append(now - sent)
        self.last_recv = now

    @property
    def delivered(self) -> float:
        span = self.last_recv - self.first_send
        return len(self.latencies) / span if span > 0 else 0.0

    def pct(self, q: float) -> float:
        """q-th percentile of the per-token latency through the hop, ms."""
        return _percentile(self.latencies, q)

    def itl(self, q: float) -> float:
        """q-th percentile of the inter-token latency as the receiver sees it, ms.

        As in bench.mesh_overhead: the gap between a stream's consecutive arrivals,
        shared by the tokens of one arrival; the first arrival of a stream is excluded.
        """
        gaps = []
        for seen in self.arrivals.values():
            for (t0, _), (t1, n) in zip(seen, seen[1:]):
                gaps.extend([(t1 - t0) / n] * n)
        return _percentile(gaps, q)


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return 1000 * ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


async def pace(streams: list[str], rounds: int, step_s: float, send, run: HopRun, send_round=None) -> None:
    """Send one token per stream per round; record each token's send time.

    send(stream, k) sends one token; send_round(k), when given, sends the whole
    round at once (a worker sends one engine step's events as one message).
    """
    run.first_send = time.perf_counter()
    next_round = run.first_send
    for k in range(rounds):
        now = time.perf_counter()
        for s in streams:
            run.sent_at[(s, k)] = now if send_round else time.perf_counter()
            if not send_round:
                send(s, k)
        if send_round:
            send_round(k)
        if step_s:
            next_round += step_s
            await asyncio.sleep(max(0.0, next_round - time.perf_counter()))
        else:
            await asyncio.sleep(0)  # let the receiver drain


def dealer(endpoint: str) -> zmq.asyncio.Socket:
    sock = zmq.asyncio.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    sock.connect(endpoint)
    return sock


def router(endpoint: str) -> zmq.asyncio.Socket:
    sock = zmq.asyncio.Context.instance().socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    sock.bind(endpoint)
    return sock


async def wait_all(received: dict[str, int], streams, want: int, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while any(received.get(s, 0) < want for s in streams):
        if time.monotonic() > deadline:
            raise TimeoutError(f"tokens missing: got {sum(received.values())} of {want * len(streams)}")
        await asyncio.sleep(0.01)


class Hop:
    """Load peers around one service; they live across measurements (ports stay bound)."""

    def __init__(self):
        self.tasks: list[asyncio.Task] = []
        self.run: HopRun | None = None
        self.received: dict[str, int] = {}

    def count(self, stream: str, tokens: int) -> None:
        self.run.arrivals.setdefault(stream, []).append((time.perf_counter(), tokens))
        for _ in range(tokens):
            k = self.received.get(stream, 0)
            self.run.received(stream, k)
            self.received[stream] = k + 1

    def background(self, coro) -> None:
        self.tasks.append(asyncio.create_task(coro))

    async def measure(self, streams: list[str], rounds: int, step_s: float, send, send_round=None) -> HopRun:
        self.run = HopRun(offered=len(streams) / step_s if step_s else 0.0)
        self.received = {}
        await pace(streams, rounds, step_s, send, self.run, send_round)
        await wait_all(self.received, streams, rounds)
        return self.run

    def close(self) -> None:
        for t in self.tasks:
            t.cancel()


async def answer_pings(sock: zmq.asyncio.Socket, on_other) -> None:
    """A ROUTER peer that says ready to every Ping and hands other messages on."""
    while True:
        ident, frame = await sock.recv_multipart()
        msg = protocol.decode(frame)
        if isinstance(msg, Ping):
            await sock.send_multipart([ident, protocol.encode(Pong(msg.sent_at, True, [MODEL], 1, 4096))])
        else:
            on_other(ident, msg)


# ---------------------------------------------------------------- scheduler
class SchedulerHop(Hop):
    """worker peer --TokenEvent--> scheduler --TokenEvent--> formatter peer."""

    def __init__(self, settings: Settings):
        super().__init__()
        self.worker, self.formatter = dealer(settings.scheduler_backend), dealer(settings.scheduler_frontend)
        self.routed: set[str] = set()
        self.background(self._worker_rx())
        self.background(self._formatter_rx())

    async def _worker_rx(self):
        while True:
            msg = protocol.decode(await self.worker.recv())
            if isinstance(msg, Submit):
                self.routed.add(msg.request_id)

    async def _formatter_rx(self):
        while True:
            msg = protocol.decode(await self.formatter.recv())
            if isinstance(msg, TokenEvent) and msg.token_ids and self.run is not None:
                self.count(msg.request_id, len(msg.token_ids))

    async def __call__(self, concurrency: int, rounds: int, step_s: float, tag: str) -> HopRun:
        await self.worker.send(protocol.encode(Register("bench", MODEL, 4096, 16, 10_000, 10_000)))
        await asyncio.sleep(0.2)
        streams = [f"{tag}-{i}" for i in range(concurrency)]
        for s in streams:
            await self.formatter.send(protocol.encode(Submit(s, [TOKEN, TOKEN + 1], SamplingParams(max_tokens=rounds))))
        await until(lambda: all(s in self.routed for s in streams), "the scheduler routed every request")
        step_frames = [protocol.encode(TokenEvent(s, token_ids=[TOKEN], worker_id="bench")) for s in streams]
        # as services/worker/main.py sends: one engine step's events in one multi-frame message
        run = await self.measure(streams, rounds, step_s, None, lambda k: self.worker.send_multipart(step_frames, flags=zmq.DONTWAIT))
        for s in streams:
            await self.worker.send(protocol.encode(TokenEvent(s, finish_reason="length", worker_id="bench")))
        return run

    def close(self) -> None:
        super().close()
        self.worker.close(0)
        self.formatter.close(0)


# ---------------------------------------------------------------- formatter
class FormatterHop(Hop):
    """scheduler peer --TokenEvent--> formatter --Delta--> gateway peer."""

    def __init__(self, settings: Settings):
        super().__init__()
        self.scheduler, self.gateway = router(settings.scheduler_frontend), dealer(settings.formatter_bind)
        self.submits: list[str] = []  # the formatter's Submit ids
        self.identity = b""
        self.background(answer_pings(self.scheduler, self._on_submit))
        self.background(self._gateway_rx())

    def _on_submit(self, ident: bytes, msg) -> None:
        if isinstance(msg, Submit):
            self.identity = ident
            self.submits.append(msg.request_id)

    async def _gateway_rx(self):
        while True:
            msg = protocol.decode(await self.gateway.recv())
            if isinstance(msg, Delta) and msg.token_ids and self.run is not None:
                self.count(msg.request_id, len(msg.token_ids))

    async def __call__(self, concurrency: int, rounds: int, step_s: float, tag: str) -> HopRun:
        await asyncio.sleep(1.0)  # the formatter has heard a Pong
        streams = [f"{tag}-{i}" for i in range(concurrency)]
        body = {"model": MODEL, "prompt": [TOKEN, TOKEN + 1], "max_tokens": rounds + 1, "stream": True, "ignore_eos": True}
        self.submits.clear()
        for s in streams:
            await self.gateway.send(protocol.encode(GenerateRequest(s, "completion", body)))
        await until(lambda: len(self.submits) >= concurrency, "the formatter submitted every request")
        # a Submit id is the request id, maybe with a choice suffix: map it to the longest matching stream
        subs = {max((s for s in streams if sub.startswith(s)), key=len): sub for sub in self.submits}
        frames = {s: protocol.encode(TokenEvent(subs[s], token_ids=[TOKEN + 7])) for s in streams}
        run = await self.measure(streams, rounds, step_s, lambda s, k: self.scheduler.send_multipart([self.identity, frames[s]], flags=zmq.DONTWAIT))
        for s in streams:
            self.scheduler.send_multipart([self.identity, protocol.encode(TokenEvent(subs[s], finish_reason="length"))], flags=zmq.DONTWAIT)
        return run

    def close(self) -> None:
        super().close()
        self.scheduler.close(0)
        self.gateway.close(0)


# ---------------------------------------------------------------- gateway
async def sse_client(base_url: str, rounds: int, hop: Hop, prompt: list[int] | None = None) -> None:
    """One streamed completion; counts the tokens of each chunk (one character of text each,
    several in a chunk when the client lags) for hop."""
    body = {"model": MODEL, "prompt": prompt or [TOKEN, TOKEN + 1], "max_tokens": rounds + 1, "stream": True}
    async for chunk in post_sse(base_url, "/v1/completions", body):
        tokens = sum(len(c.get("text") or "") for c in chunk.get("choices", []))
        if tokens and hop.run is not None:
            hop.count(chunk["id"], tokens)


class GatewayHop(Hop):
    """formatter peer --Delta--> gateway --SSE--> HTTP client."""

    def __init__(self, settings: Settings, base_url: str):
        super().__init__()
        self.base_url = base_url
        self.formatter = router(settings.formatter_bind)
        self.requests: dict[str, bytes] = {}  # GenerateRequest id -> the gateway's routing id
        self.background(answer_pings(self.formatter, self._on_request))

    def _on_request(self, ident: bytes, msg) -> None:
        if isinstance(msg, GenerateRequest):
            self.requests[msg.request_id] = ident

    async def __call__(self, concurrency: int, rounds: int, step_s: float, tag: str) -> HopRun:
        await asyncio.sleep(1.0)  # the gateway has heard a Pong and is ready
        self.requests.clear()
        clients = [asyncio.create_task(sse_client(self.base_url, rounds, self)) for _ in range(concurrency)]
        await until(lambda: len(self.requests) >= concurrency, "the gateway forwarded every request")
        streams = list(self.requests)

        def send(s: str, k: int) -> None:
            delta = Delta(s, content="x", token_ids=[TOKEN], completion_tokens=k + 1)
            self.formatter.send_multipart([self.requests[s], protocol.encode(delta)], flags=zmq.DONTWAIT)

        run = await self.measure(streams, rounds, step_s, send)
        for s in streams:
            done = Delta(s, finish_reason="length", prompt_tokens=2, completion_tokens=rounds)
            self.formatter.send_multipart([self.requests[s], protocol.encode(done)], flags=zmq.DONTWAIT)
        await asyncio.wait_for(asyncio.gather(*clients), 30)
        return run

    def close(self) -> None:
        super().close()
        self.formatter.close(0)


# ---------------------------------------------------------------- the whole mesh
class MeshHop(Hop):
    """worker peer --TokenEvent--> scheduler -> formatter -> gateway --SSE--> HTTP client.

    Every service of the mesh, real, in its own process; only the engine is this
    process's worker peer, which registers like `rose worker` and sends one step's
    TokenEvents (one token per stream) as one multi-frame message, as
    services/worker/main.py does. The latency is what the mesh adds to a token on its
    way from the worker to the client.
    """

    TEXT_TOKEN = 87  # "x" in o200k: a token is one character of a chunk's text

    def __init__(self, settings: Settings, base_url: str, prompt_tokens: int = 2):
        super().__init__()
        self.base_url = base_url
        self.prompt_tokens = prompt_tokens
        self.worker = dealer(settings.scheduler_backend)
        self.submits: dict[str, str] = {}  # gateway request id -> the Submit's (sub-request) id
        self.submit_at: dict[str, float] = {}
        self.background(self._worker_rx())
        self.background(self._heartbeats())

    async def _heartbeats(self):
        await self.worker.send(protocol.encode(Register("bench", MODEL, 4096, 16, 100_000, 1024)))
        while True:
            await self.worker.send(protocol.encode(Heartbeat("bench", total_blocks=100_000, free_blocks=100_000)))
            await asyncio.sleep(0.5)

    async def _worker_rx(self):
        while True:
            msg = protocol.decode(await self.worker.recv())
            if isinstance(msg, Submit):
                self.submits[msg.request_id.rsplit("/", 1)[0]] = msg.request_id
                self.submit_at[msg.request_id] = time.perf_counter()

    async def __call__(self, concurrency: int, rounds: int, step_s: float, tag: str) -> HopRun:
        await asyncio.sleep(1.0)  # the scheduler has the worker, the gateway a ready formatter
        self.submits.clear()
        self.submit_at.clear()
        burst = time.perf_counter()
        # distinct prompts within a burst; the worker peer reports no cached blocks, so none ever hits
        clients = [asyncio.create_task(sse_client(self.base_url, rounds, self,
                                                  [TOKEN + (i * self.prompt_tokens + j) % 150_000
                                                   for j in range(self.prompt_tokens)]))
                   for i in range(concurrency)]
        await until(lambda: len(self.submits) >= concurrency, "the mesh submitted every request")
        admission = [t - burst for t in self.submit_at.values()]
        streams = list(self.submits)
        step = [protocol.encode(TokenEvent(self.submits[s], token_ids=[self.TEXT_TOKEN], worker_id="bench")) for s in streams]
        run = await self.measure(streams, rounds, step_s, None, lambda k: self.worker.send_multipart(step, flags=zmq.DONTWAIT))
        run.admission = admission
        done = [protocol.encode(TokenEvent(self.submits[s], finish_reason="length", prompt_tokens=2, worker_id="bench"))
                for s in streams]
        self.worker.send_multipart(done, flags=zmq.DONTWAIT)
        await asyncio.wait_for(asyncio.gather(*clients), 30)
        return run

    def close(self) -> None:
        super().close()
        self.worker.close(0)


async def until(predicate, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out: {what}")
        await asyncio.sleep(0.01)


# ---------------------------------------------------------------- main
def run_hop(name: str, levels: list[int], rounds: int, step_s: float, home: str,
            prompt_tokens: int = 2) -> list[tuple[int, HopRun, HopRun]]:
    """Start the one service the hop needs, measure paced then unpaced at each concurrency."""
    base = dataclasses.replace(Settings.from_env(), home=home, log_level="warning", heartbeat_interval=0.5, heartbeat_timeout=30.0)
    mesh = Mesh(with_free_ports(base), log_dir=f"{home}/logs-{name}")
    results = []
    try:
        if name == "scheduler":
            mesh.settings = dataclasses.replace(mesh.settings, redis_url=mesh.start_redis())
            mesh.spawn("scheduler", "scheduler", {})
        elif name == "formatter":
            mesh.spawn("formatter", "formatter", {})
        elif name == "gateway":
            mesh.settings = dataclasses.replace(mesh.settings, formatter_urls=mesh.settings.formatter_bind)
            mesh.spawn("gateway", "gateway", {})
        else:  # the whole mesh, the engine aside
            mesh.settings = dataclasses.replace(mesh.settings, redis_url=mesh.start_redis(),
                                                formatter_urls=mesh.settings.formatter_bind)
            for role in ("scheduler", "formatter", "gateway"):
                mesh.spawn(role, role, {})
        time.sleep(4.0)  # imports
        if mesh.crashed():
            raise RuntimeError(mesh.describe_crash(mesh.crashed()[0]))
        results = asyncio.run(_measure_levels(name, mesh, levels, rounds, step_s, prompt_tokens))
    finally:
        mesh.stop()
    return results


async def _measure_levels(name: str, mesh: Mesh, levels: list[int], rounds: int, step_s: float, prompt_tokens: int):
    hop = {"scheduler": lambda: SchedulerHop(mesh.settings), "formatter": lambda: FormatterHop(mesh.settings),
           "gateway": lambda: GatewayHop(mesh.settings, mesh.url),
           "mesh": lambda: MeshHop(mesh.settings, mesh.url, prompt_tokens)}[name]()
    results = []
    try:
        for c in levels:
            paced = await hop(c, rounds, step_s, f"{name}-{c}-p")
            unpaced = await hop(c, rounds, 0.0, f"{name}-{c}-u")
            results.append((c, paced, unpaced))
            print(f"  {name} x{c}: paced p50 {paced.pct(50):.2f} ms, unpaced {unpaced.delivered:.0f} tok/s", file=sys.stderr)
    finally:
        hop.close()
    return results


def table(rows: list[tuple[str, int, HopRun, HopRun]]) -> str:
    head = ("hop", "streams", "offered tok/s", "delivered tok/s", "latency p50", "latency p99", "ITL p50", "ITL p99",
            "capacity tok/s (unpaced)", "admission first / p50 / last")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, c, paced, unpaced in rows:
        lines.append(f"| {name} | {c} | {paced.offered:.0f} | {paced.delivered:.0f} | {paced.pct(50):.2f} ms | {paced.pct(99):.2f} ms | "
                     f"{paced.itl(50):.2f} ms | {paced.itl(99):.2f} ms | {unpaced.delivered:.0f} | "
                     f"{_admission(paced)} |")
    return "\n".join(lines)


def _admission(run: HopRun) -> str:
    if not run.admission:
        return "-"
    return f"{1000 * min(run.admission):.1f} / {_percentile(run.admission, 50):.1f} / {1000 * max(run.admission):.1f} ms"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", default="1,16,64")
    parser.add_argument("--rounds", type=int, default=200, help="tokens per stream")
    parser.add_argument("--step-ms", type=float, default=10.0, help="time between rounds when paced")
    parser.add_argument("--hops", default="scheduler,formatter,gateway,mesh",
                        help="mesh: scheduler, formatter and gateway together, a worker peer in place of the engine")
    parser.add_argument("--prompt-tokens", type=int, default=2, help="token ids in each request's prompt")
    parser.add_argument("--home", default=None)
    args = parser.parse_args(argv)
    levels = [int(c) for c in args.concurrency.split(",") if c]
    home = args.home or tempfile.mkdtemp(prefix="rose-hops-")
    from services.setup import setup

    setup(dataclasses.replace(Settings.from_env(), home=home))
    rows = []
    for name in args.hops.split(","):
        for c, paced, unpaced in run_hop(name, levels, args.rounds, args.step_ms / 1000, home, args.prompt_tokens):
            rows.append((name, c, paced, unpaced))
    print(f"\n{args.rounds} tokens per stream, paced at one token per stream every {args.step_ms:g} ms, "
          f"prompts of {args.prompt_tokens} tokens")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

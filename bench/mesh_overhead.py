"""What the mesh costs per streamed token: gateway -> formatter -> scheduler -> worker
against the same engine called in process.

    python -m bench.mesh_overhead [--concurrency 1,16,64] [--max-tokens 32] [--prompt-tokens 16] [--rounds 1]

For each concurrency it runs that many streams of `--max-tokens` tokens (distinct
token-id prompts, ignore_eos) twice: through AsyncEngine in this process, then
through a started mesh (1 formatter, 1 worker, a private redis) over HTTP/SSE, read
by a lean client (bench.streaming.post_sse). It reports streamed tokens/s (all streams' tokens over the wall time) and the
inter-token latency (time between a stream's consecutive tokens, first token
excluded) at p50/p99; "added" is mesh minus in-process. Everything shares this
machine's cores, so the mesh's numbers include its processes competing with the
engine for CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import statistics
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass, field

from shared.config import Settings
from shared.protocol import SamplingParams


@dataclass
class Run:
    """One batch of concurrent streams: per-token gaps (s) and totals."""

    gaps: list[float] = field(default_factory=list)
    tokens: int = 0
    wall_s: float = 0.0
    ttft: list[float] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s if self.wall_s else 0.0

    def pct(self, q: float) -> float:
        """q-th percentile of the inter-token gaps, ms."""
        if not self.gaps:
            return float("nan")
        ordered = sorted(self.gaps)
        return 1000 * ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


def prompt(i: int, length: int = 16) -> list[int]:
    return [1000 + (i * 131 + j * 7) % 150000 for j in range(length)]


def record(run: Run, arrivals: list[tuple[float, float]], started: float) -> None:
    """arrivals: (time, tokens in that event) of one stream, in order."""
    if not arrivals:
        return
    run.ttft.append(arrivals[0][0] - started)
    for (t0, _), (t1, n) in zip(arrivals, arrivals[1:]):
        if n:
            run.gaps.extend([(t1 - t0) / n] * max(1, round(n)))  # several tokens in one event share its gap
    run.tokens += round(sum(n for _, n in arrivals))


# ---------------------------------------------------------------- in process
async def in_process(engine, concurrency: int, max_tokens: int, tag: str, length: int = 16, run: Run | None = None) -> Run:
    run = run or Run()
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)

    async def stream(i: int) -> None:
        started = time.perf_counter()
        arrivals = []
        first = zlib.crc32(tag.encode()) % 100_000  # distinct prompts per tag: no prefix-cache hits
        async for out in engine.generate(f"{tag}-{i}", prompt(first + i, length), params):
            if out.token_ids:
                arrivals.append((time.perf_counter(), len(out.token_ids)))
        record(run, arrivals, started)

    t0 = time.perf_counter()
    await asyncio.gather(*(stream(i) for i in range(concurrency)))
    run.wall_s += time.perf_counter() - t0
    return run


# ---------------------------------------------------------------- through the mesh
async def through_mesh(base_url: str, concurrency: int, max_tokens: int, tag: int, length: int = 16,
                       run: Run | None = None) -> Run:
    """The same streams through the gateway, read by bench.streaming.post_sse (a lean client:
    it shares the cores with the mesh, so httpx's CPU per chunk would be charged to the mesh)."""
    from bench.streaming import post_sse

    run = run or Run()

    async def stream(i: int) -> None:
        body = {"model": "gpt-oss-tiny", "prompt": prompt(i + tag, length), "max_tokens": max_tokens, "stream": True, "ignore_eos": True,
                "stream_options": {"include_usage": True}}
        started = time.perf_counter()
        arrivals = []
        usage_tokens = None
        async for chunk in post_sse(base_url, "/v1/completions", body):
            if "error" in chunk:
                raise RuntimeError(f"stream error: {chunk['error']}")
            if chunk.get("usage"):
                usage_tokens = chunk["usage"]["completion_tokens"]
            if any(c.get("text") for c in chunk.get("choices", [])):
                arrivals.append((time.perf_counter(), 1))
        if usage_tokens and arrivals and usage_tokens != len(arrivals):
            # a chunk carried several tokens: spread them over the chunks evenly
            per = usage_tokens / len(arrivals)
            arrivals = [(t, per) for t, _ in arrivals]
        record(run, arrivals, started)

    t0 = time.perf_counter()
    await asyncio.gather(*(stream(i) for i in range(concurrency)))
    run.wall_s += time.perf_counter() - t0
    return run


# ---------------------------------------------------------------- the engine's floor
def engine_floor(rows: int = 64) -> None:
    """Print what a step costs whatever the checkpoint, given the o200k vocabulary:
    the unembedding at two hidden sizes and the sampler over [rows, vocab], one torch thread."""
    import torch

    from services.worker.engine.sampler import SamplingRow, sample
    from services.worker.main import reuse_freed_memory

    reuse_freed_memory()
    torch.set_num_threads(1)
    vocab = 201088

    def ms(f, k: int = 10) -> float:
        f()
        t = time.perf_counter()
        for _ in range(k):
            f()
        return (time.perf_counter() - t) / k * 1000

    for hidden in (64, 32):
        x, w = torch.randn(rows, hidden), torch.randn(vocab, hidden)
        print(f"unembedding, {rows} rows, hidden {hidden}: {ms(lambda: torch.nn.functional.linear(x, w)):.1f} ms")
    logits = torch.randn(rows, vocab)
    for temperature in (1.0, 0.0):
        params = [SamplingRow(SamplingParams(temperature=temperature), [1], 1) for _ in range(rows)]
        took = ms(lambda: sample(logits, params, torch.Generator().manual_seed(0)))
        print(f"sample {rows} rows over {vocab} columns, temperature {temperature}: {took:.1f} ms")


# ---------------------------------------------------------------- main
def table(rows: list[tuple[int, Run, Run]]) -> str:
    head = ("streams", "in-proc tok/s", "mesh tok/s", "ITL p50 in-proc", "ITL p50 mesh", "added p50", "ITL p99 in-proc", "ITL p99 mesh", "added p99")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c, local, mesh in rows:
        lines.append(
            f"| {c} | {local.tokens_per_s:.0f} | {mesh.tokens_per_s:.0f} | {local.pct(50):.2f} ms | {mesh.pct(50):.2f} ms | "
            f"{mesh.pct(50) - local.pct(50):+.2f} ms | {local.pct(99):.2f} ms | {mesh.pct(99):.2f} ms | {mesh.pct(99) - local.pct(99):+.2f} ms |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", default="1,16,64", help="comma-separated stream counts")
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens per stream")
    parser.add_argument("--prompt-tokens", type=int, default=16, help="token ids in each stream's prompt")
    parser.add_argument("--rounds", type=int, default=1, help="times each level runs (one after another, pooled)")
    parser.add_argument("--home", default=None, help="rose home (default: a temporary folder)")
    parser.add_argument("--floor", action="store_true", help="only time the unembedding and sampling of a 64-row step")
    args = parser.parse_args(argv)
    if args.floor:
        engine_floor()
        return 0
    levels = [int(c) for c in args.concurrency.split(",") if c]

    from services.launcher import Mesh, with_free_ports, worker_threads
    from services.setup import setup
    from services.worker.engine import AsyncEngine, Engine

    home = args.home or tempfile.mkdtemp(prefix="rose-bench-")
    settings = dataclasses.replace(Settings.from_env(), home=home, max_num_seqs=max(64, max(levels)), max_model_len=4096, log_level="warning")
    setup(settings)

    import torch

    from services.worker.main import reuse_freed_memory

    # the same torch threads and allocator settings as the mesh's worker
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or worker_threads(1)))
    if settings.device == "cpu":
        reuse_freed_memory()
    print(f"in process: {settings.model_path}, {torch.get_num_threads()} torch threads", file=sys.stderr)
    engine = AsyncEngine(Engine.from_settings(settings))
    local: dict[int, Run] = {}
    try:
        asyncio.run(in_process(engine, 2, 4, "warmup"))
        for c in levels:
            for r in range(args.rounds):
                local[c] = asyncio.run(in_process(engine, c, args.max_tokens, f"c{c}-r{r}", args.prompt_tokens,
                                                  local.get(c)))
            print(f"  {c} streams: {local[c].tokens_per_s:.0f} tok/s", file=sys.stderr)
    finally:
        engine.shutdown()
    del engine

    mesh = Mesh(with_free_ports(settings), formatters=1, workers=1, log_dir=f"{home}/logs")
    print(f"mesh: starting (logs in {home}/logs)", file=sys.stderr)
    rows = []
    try:
        mesh.start(300)
        asyncio.run(through_mesh(mesh.url, 2, 4, 10_000))
        for c in levels:
            run = None
            for r in range(args.rounds):
                run = asyncio.run(through_mesh(mesh.url, c, args.max_tokens, 20_000 + 1000 * r + c, args.prompt_tokens,
                                               run))
            print(f"  {c} streams: {run.tokens_per_s:.0f} tok/s", file=sys.stderr)
            rows.append((c, local[c], run))
    finally:
        mesh.stop()
    print(f"\nmax_tokens={args.max_tokens}, prompt {args.prompt_tokens} tokens, {args.rounds} round(s), tiny checkpoint, backend={settings.backend}, device={settings.device}, "
          f"{torch.get_num_threads()} torch threads, {os.cpu_count()} cores")
    print(table(rows))
    for c, local_run, mesh_run in rows:
        print(f"TTFT p50 at {c} streams: in-proc {1000 * statistics.median(local_run.ttft):.1f} ms, mesh {1000 * statistics.median(mesh_run.ttft):.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())

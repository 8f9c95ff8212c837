"""What bench.kernels' timing sees of a short kernel, timed four ways in one run.

    python -m bench.timing_check [--tokens 4096] [--reps 3]

Each kernel is captured in a CUDA graph and its replays timed by CUDA events:
  bench.measure     bench.kernels' own timing (measure: a busy GPU before each timed replay)
  per replay        events around each replay, the GPU idle before (the method before busy_gpu):
                    the start event records at once, then the GPU waits for the host's replay
  busy before       the same after torch.cuda._sleep keeps the GPU busy while the host enqueues
  back to back      20 replays between one pair of events (no gaps, but the inputs stay warm in L2)
as % of the copy ceiling measured in the same run. Where "per replay" sits below "busy before",
the difference is host time, not the kernel's.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from bench.kernels import BUSY_CYCLES, E, H, K, copy_bandwidth, measure


def graph_of(fn) -> torch.cuda.CUDAGraph:
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    return graph


def per_replay(graph, busy: bool, reps: int = 20) -> float:
    """Median seconds of one replay between two events, with or without a busy GPU before."""
    times = []
    for _ in range(reps):
        if busy:
            torch.cuda._sleep(BUSY_CYCLES)
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return statistics.median(times)


def back_to_back(graph, reps: int = 20) -> float:
    torch.cuda._sleep(BUSY_CYCLES)
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(reps):
        graph.replay()
    b.record()
    b.synchronize()
    return a.elapsed_time(b) / 1e3 / reps


def cases(tokens: int) -> list[tuple[str, int, object]]:
    from kernels import moe_dispatch, rmsnorm

    bf = dict(device="cuda", dtype=torch.bfloat16)
    x, out = torch.randn(tokens, H, **bf), torch.empty(tokens * K, H, **bf)
    ids = torch.rand(tokens, E, device="cuda").argsort(1)[:, :K].to(torch.int32).contiguous()
    r = moe_dispatch.route(ids, E)
    w = torch.rand(H, **bf) + 0.5
    moved = (tokens + tokens * K) * H * 2
    return [("moe dispatch", moved, lambda: moe_dispatch.dispatch(x, r, out)),
            ("moe dispatch, a vector a thread", moved, lambda: moe_dispatch.dispatch(x, r, out, bulk=False)),
            ("rmsnorm", (2 * tokens * H + H) * 2, lambda: rmsnorm.rmsnorm(x, w, 1e-5))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--reps", type=int, default=3, help="rounds over the kernels")
    args = parser.parse_args()
    ceiling = max(copy_bandwidth())
    print(f"{torch.cuda.get_device_name()}: copy ceiling {ceiling / 1e12:.2f} TB/s; % of it, {args.tokens} tokens")
    print("| round | kernel | bench.measure | per replay | busy before | back to back |")
    print("| --- | --- | --- | --- | --- | --- |")
    for round_ in range(args.reps):
        for name, nbytes, fn in cases(args.tokens):
            graph = graph_of(fn)
            pct = [100 * nbytes / t / ceiling for t in
                   (measure([fn])[0], per_replay(graph, False), per_replay(graph, True), back_to_back(graph))]
            print(f"| {round_} | {name} | " + " | ".join(f"{p:.1f}" for p in pct) + " |", flush=True)


if __name__ == "__main__":
    main()

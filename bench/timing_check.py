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

import torch

from bench.kernels import E, H, K, capture, copy_bandwidth, measure, timed


def back_to_back(graph, reps: int = 20) -> float:
    """Seconds a replay of `reps` replays queued between one pair of events (after a busy GPU)."""
    def replays():
        for _ in range(reps):
            graph.replay()

    return timed(replays, reps=1, calls=reps)


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
            graph = capture([fn])
            pct = [100 * nbytes / t / ceiling for t in
                   (measure([fn])[0], timed(graph.replay, busy=False), timed(graph.replay), back_to_back(graph))]
            print(f"| {round_} | {name} | " + " | ".join(f"{p:.1f}" for p in pct) + " |", flush=True)


if __name__ == "__main__":
    main()

"""Where a cuda-backend decode step spends its GPU time, kernel by kernel.

    python -m bench.profile_step                    # 24-layer gpt-oss-20b shapes, batch 1
    python -m bench.profile_step --batch 64 --layers 2
    python -m bench.profile_step --batch 256 --host  # and where the host time of a graph step goes

Runs the step eagerly under torch.profiler (the kernels are the ones a CUDA graph
replays; only the gaps between them differ) and prints GPU time per kernel name, then
the replayed graph's time for comparison.
"""

from __future__ import annotations

import argparse

import torch

from bench.decode_step import BLOCK, decode_batch, random_checkpoint, time_replay, time_steps
from services.worker.model import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--rows", type=int, default=25, help="kernels to list")
    parser.add_argument("--host", action="store_true", help="also profile the host side of graph steps (cProfile)")
    args = parser.parse_args()
    path = random_checkpoint("20b", args.layers)
    model = load_model(path, backend="cuda")
    batch, blocks = decode_batch(args.batch, args.context, model.config.sliding_window, model.config.vocab_size)
    kv = model.make_kv_cache(blocks, BLOCK)
    time_steps(model, batch, kv, 3)
    replay = time_replay(model, 20)
    if args.host:
        import cProfile
        import pstats

        profiler = cProfile.Profile()
        profiler.enable()
        time_steps(model, batch, kv, 20)
        profiler.disable()
        print(f"host side of 20 graph steps at batch {args.batch} (cProfile, by own time):")
        pstats.Stats(profiler).sort_stats("tottime").print_stats(args.rows)
    model.cuda_graphs = False
    time_steps(model, batch, kv, 2)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        time_steps(model, batch, kv, 1)
    events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    total = sum(e.self_device_time_total for e in events)
    count = sum(e.count for e in events)
    print(f"batch {args.batch}, {model.config.num_hidden_layers} layers: {count} kernels, "
          f"{total / 1e3:.3f} ms of kernel time; graph replay {replay * 1e3:.3f} ms")
    print("| kernel | calls | total us | us/call | share |")
    print("| --- | --- | --- | --- | --- |")
    for e in sorted(events, key=lambda e: -e.self_device_time_total)[: args.rows]:
        name = e.key if len(e.key) <= 90 else e.key[:87] + "..."
        print(f"| {name} | {e.count} | {e.self_device_time_total:.0f} | {e.self_device_time_total / e.count:.1f} | "
              f"{100 * e.self_device_time_total / total:.1f}% |")


if __name__ == "__main__":
    main()

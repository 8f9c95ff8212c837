"""Where a cuda-backend decode step spends its GPU time, kernel by kernel.

    python -m bench.profile_step                    # 24-layer gpt-oss-20b shapes, batch 1
    python -m bench.profile_step --batch 64 --layers 2
    python -m bench.profile_step --batch 256 --host  # and where the host time of a graph step goes
    python -m bench.profile_step --prefill 1024 --host  # one sequence's prefill instead (eager, as served)
    python -m bench.profile_step --engine --batch 1   # the Engine's decode loop: the graph and what runs around it

Runs the step eagerly under torch.profiler (the kernels are the ones a CUDA graph
replays; only the gaps between them differ) and prints GPU time per kernel name, then
the replayed graph's time for comparison. --engine instead profiles the in-process
Engine decoding --batch requests (overlapped, temperature 1, as served): its wall
time per decode step, then the kernels by name (the graph's and those around it:
sampling, copies), so what a served token costs beyond the replay shows up.
"""

from __future__ import annotations

import argparse

import torch

from bench.decode_step import BLOCK, decode_batch, random_checkpoint, time_replay, time_steps
from services.worker.model import load_model
from services.worker.model.batch import ForwardBatch


def prefill_batch(tokens: int, vocab: int) -> tuple[ForwardBatch, dict[str, int]]:
    """One sequence's whole prompt of `tokens` tokens in one step (a request's first step), and its blocks."""
    pages = list(range((tokens + BLOCK - 1) // BLOCK))
    batch = ForwardBatch(token_ids=torch.randint(0, vocab, (tokens,)), positions=torch.arange(tokens),
                         query_lens=[tokens], context_lens=[tokens], block_tables={"full": [pages], "sliding": [pages]})
    return batch, {"full": len(pages), "sliding": len(pages)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--rows", type=int, default=25, help="kernels to list")
    parser.add_argument("--host", action="store_true", help="also profile the host side of graph steps (cProfile)")
    parser.add_argument("--prefill", type=int, default=0, help="profile one sequence's prefill of this many tokens")
    parser.add_argument("--engine", action="store_true", help="profile the Engine's decode loop at --batch")
    args = parser.parse_args()
    path = random_checkpoint("20b", args.layers)
    model = load_model(path, backend="cuda")
    if args.prefill:
        return profile_prefill(model, args)
    if args.engine:
        return profile_engine(model, args)
    batch, blocks = decode_batch(args.batch, args.context, model.config.sliding_window, model.config.vocab_size)
    kv = model.make_kv_cache(blocks, BLOCK)
    time_steps(model, batch, kv, 3)
    replay = time_replay(model, 20)
    if args.host:
        host_profile(model, batch, kv, 20, f"graph steps at batch {args.batch}", args.rows)
    model.cuda_graphs = False
    time_steps(model, batch, kv, 2)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        time_steps(model, batch, kv, 1)
    print(f"batch {args.batch}, {model.config.num_hidden_layers} layers: " + kernel_table(prof, args.rows,
          f"; graph replay {replay * 1e3:.3f} ms"))


def profile_prefill(model, args) -> None:
    """Wall time of an eager prefill step against its kernel time (host-bound when the first is larger)."""
    batch, blocks = prefill_batch(args.prefill, model.config.vocab_size)
    kv = model.make_kv_cache(blocks, BLOCK)
    time_steps(model, batch, kv, 3)  # JIT builds, autotuning
    wall = sorted(time_steps(model, batch, kv, 10))[5]
    if args.host:
        host_profile(model, batch, kv, 5, f"prefill steps of {args.prefill} tokens", args.rows)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        time_steps(model, batch, kv, 1)
    print(f"prefill of {args.prefill} tokens, {model.config.num_hidden_layers} layers, step wall {wall * 1e3:.2f} ms "
          "(median of 10): " + kernel_table(prof, args.rows))


def profile_engine(model, args, steps: int = 40) -> None:
    """The Engine decoding args.batch requests of args.context prompt tokens: wall per step, then the kernels.

    The profiler slows the graph's kernels (their sum passes the wall time), so the wall time
    is taken first, unprofiled; the table says which kernels run and what each costs.
    """
    import time

    from services.worker.engine.engine import Engine
    from shared.protocol import SamplingParams

    vocab = model.config.vocab_size
    total = args.context + 4 * steps
    engine = Engine(model, num_blocks=args.batch * (total // BLOCK + 2), block_size=BLOCK, max_num_seqs=args.batch,
                    max_num_batched_tokens=max(2048, args.context), max_model_len=total + 1, seed=0)
    params = SamplingParams(max_tokens=4 * steps, temperature=1.0, ignore_eos=True)
    for i in range(args.batch):
        engine.add_request(f"p{i}", torch.randint(0, vocab, (args.context,)).tolist(), params)
    started: set[str] = set()
    while len(started) < args.batch:  # every prefill done
        started.update(o.request_id for o in engine.step() if o.token_ids)
    for _ in range(4):  # decode steps: the graph captured
        engine.step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    torch.cuda.synchronize()
    wall = (time.perf_counter() - start) / steps
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            engine.step()
        torch.cuda.synchronize()
    print(f"engine decode loop, batch {args.batch}, {model.config.num_hidden_layers} layers: wall {wall * 1e3:.3f} "
          f"ms/step over {steps} steps; then {steps} steps profiled: " + kernel_table(prof, args.rows))


def host_profile(model, batch, kv, steps: int, what: str, rows: int) -> None:
    """Print cProfile's costliest functions (by own time) over `steps` steps."""
    import cProfile
    import pstats

    profiler = cProfile.Profile()
    profiler.enable()
    time_steps(model, batch, kv, steps)
    profiler.disable()
    print(f"host side of {steps} {what} (cProfile, by own time):")
    pstats.Stats(profiler).sort_stats("tottime").print_stats(rows)


def kernel_table(prof, rows: int, note: str = "") -> str:
    """'N kernels, T ms of kernel time' and a markdown table of the `rows` costliest kernels."""
    events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    total = sum(e.self_device_time_total for e in events)
    count = sum(e.count for e in events)
    lines = [f"{count} kernels, {total / 1e3:.3f} ms of kernel time{note}",
             "| kernel | calls | total us | us/call | share |", "| --- | --- | --- | --- | --- |"]
    for e in sorted(events, key=lambda e: -e.self_device_time_total)[:rows]:
        name = e.key if len(e.key) <= 90 else e.key[:87] + "..."
        lines.append(f"| {name} | {e.count} | {e.self_device_time_total:.0f} | {e.self_device_time_total / e.count:.1f} | "
                     f"{100 * e.self_device_time_total / total:.1f}% |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

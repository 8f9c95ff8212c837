"""The engine's decode loop on the cuda backend: what a token costs beyond the model's step.

    python -m bench.engine_step                           # 24-layer gpt-oss-20b shapes, batches 1, 8, 64
    python -m bench.engine_step --layers 2 --batches 1 --output 64

bench.decode_step times the model's step alone; here the in-process Engine runs whole
requests (schedule, forward, sample, append, outputs) with nothing around it. Per
batch size B, B requests of --prompt random tokens each generate --output tokens
(ignore_eos, temperature 1), once with each step read before the next is launched
(serial) and once with the overlap the engine uses on a GPU (the next step launched
first). It prints the decode phase's time per step (from the step after the last
prefill to the end), its tokens/s, and the roofline of bench/roofline.py for B
sequences at the mean context of that phase. --loop-requests N also keeps B requests
live closed-loop (a new one as each finishes, as a serving client does) until N have
finished: output tokens/s with the prefills mixed in, serial against overlap.
"""

from __future__ import annotations

import argparse
import json
import random
import time

import torch

from bench.decode_step import random_checkpoint
from bench.roofline import copy_bandwidth, decode_bound
from kernels.decode_attention import decode_kernel
from kernels.pdl import pdl_enabled
from services.worker.engine.engine import Engine
from services.worker.model import load_model
from shared.protocol import SamplingParams

BLOCK = 16


def decode_phase(engine: Engine, batch: int, prompt: int, output: int, vocab: int, seed: int) -> dict:
    """Run `batch` requests to the end; time per step and tokens/s once every request has its first token."""
    rng = random.Random(seed)
    params = SamplingParams(max_tokens=output, temperature=1.0, ignore_eos=True)
    for i in range(batch):
        engine.add_request(f"r{seed}-{i}", [rng.randrange(vocab) for _ in range(prompt)], params)
    started: set[str] = set()
    decode_start = None
    tokens = steps = 0
    while engine.has_work():
        outputs = engine.step()
        now = time.perf_counter()
        if decode_start is not None:
            steps += 1
            tokens += sum(len(o.token_ids) for o in outputs)
        started.update(o.request_id for o in outputs if o.token_ids)
        if decode_start is None and len(started) == batch:
            decode_start = now
    if decode_start is None:
        raise RuntimeError(f"only {len(started)} of {batch} requests produced a token (the engine's log says why)")
    elapsed = time.perf_counter() - decode_start
    return dict(step_ms=elapsed / steps * 1e3, tokens_per_s=tokens / elapsed, steps=steps, tokens=tokens)


def closed_loop(engine: Engine, streams: int, requests: int, prompt: int, output: int, vocab: int) -> dict:
    """`streams` requests live at once, a new one added as each finishes (as a serving client keeps
    them), until `requests` have finished: output tokens/s and the mean step, prefills included."""
    rng = random.Random(streams)
    params = SamplingParams(max_tokens=output, temperature=1.0, ignore_eos=True)
    added = finished = tokens = steps = 0
    start = time.perf_counter()
    while finished < requests:
        while added < requests and added - finished < streams:
            engine.add_request(f"loop{streams}-{added}", [rng.randrange(vocab) for _ in range(prompt)], params)
            added += 1
        outputs = engine.step()
        steps += 1
        tokens += sum(len(o.token_ids) for o in outputs)
        finished += sum(o.finished for o in outputs)
    elapsed = time.perf_counter() - start
    return dict(tokens_per_s=tokens / elapsed, step_ms=elapsed / steps * 1e3, steps=steps, tokens=tokens)


def run(path: str, batches: list[int], prompt: int, output: int, loop_requests: int) -> dict:
    bandwidth = copy_bandwidth("cuda")
    model = load_model(path, backend="cuda")
    c = model.config
    blocks = max(batches) * ((prompt + output + BLOCK - 1) // BLOCK + 1)
    start = time.perf_counter()
    engine = Engine(model, num_blocks=blocks, block_size=BLOCK, max_num_seqs=max(batches),
                    max_num_batched_tokens=max(2048, prompt), max_model_len=prompt + output + 1, seed=0)
    startup_s = time.perf_counter() - start
    rows = []
    for batch in batches:
        bound = decode_bound(c, bandwidth, batch, prompt + output // 2, 2)
        row = dict(batch=batch, bound_ms=bound.step_s * 1e3)
        for mode in ("serial", "overlap"):
            engine.overlap = mode == "overlap"
            decode_phase(engine, batch, prompt, min(output, 8), c.vocab_size, seed=0)  # warm: every kernel shape
            row[mode] = decode_phase(engine, batch, prompt, output, c.vocab_size, seed=batch)
            if loop_requests:
                row[f"{mode}_loop"] = closed_loop(engine, batch, loop_requests, prompt, output, c.vocab_size)
        rows.append(row)
    return dict(bandwidth=bandwidth, layers=c.num_hidden_layers, prompt=prompt, output=output, rows=rows,
                startup_s=startup_s, device=torch.cuda.get_device_name(), pdl=pdl_enabled(),
                decode_attention=decode_kernel())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=None, help="checkpoint folder (default: a random one under /tmp)")
    parser.add_argument("--preset", default="20b", choices=("20b", "120b"))
    parser.add_argument("--layers", type=int, default=None, help="num_hidden_layers (default: the preset's)")
    parser.add_argument("--batches", default="1,8,64")
    parser.add_argument("--prompt", type=int, default=1024, help="prompt tokens per request")
    parser.add_argument("--output", type=int, default=128, help="generated tokens per request")
    parser.add_argument("--loop-requests", type=int, default=0,
                        help="also run this many requests closed-loop at each batch size (prefills included)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    path = random_checkpoint(args.preset, args.layers, args.checkpoint)
    result = run(path, [int(b) for b in args.batches.split(",")], args.prompt, args.output, args.loop_requests)
    print(f"{result['device']} (PDL {'on' if result['pdl'] else 'off'}, decode attention "
          f"{result['decode_attention']}), "
          f"{result['layers']} layers, prompt {result['prompt']}, output {result['output']}, "
          f"copy bandwidth {result['bandwidth'] / 1e9:.1f} GB/s, engine start-up (kernel compiles, graph captures) "
          f"{result['startup_s']:.1f} s")
    print("| batch | serial ms/step | overlap ms/step | serial tok/s | overlap tok/s | overlap / serial | "
          "roofline ms | overlap / roofline |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in result["rows"]:
        s, o = r["serial"], r["overlap"]
        print(f"| {r['batch']} | {s['step_ms']:.3f} | {o['step_ms']:.3f} | {s['tokens_per_s']:.0f} | "
              f"{o['tokens_per_s']:.0f} | {o['tokens_per_s'] / s['tokens_per_s']:.2f}x | {r['bound_ms']:.3f} | "
              f"{o['step_ms'] / r['bound_ms']:.2f}x |")
    if args.loop_requests:
        print(f"closed loop, {args.loop_requests} requests per batch size (a new request as each finishes):")
        print("| streams | serial tok/s | overlap tok/s | serial ms/step | overlap ms/step | overlap / serial |")
        print("| --- | --- | --- | --- | --- | --- |")
        for r in result["rows"]:
            s, o = r["serial_loop"], r["overlap_loop"]
            print(f"| {r['batch']} | {s['tokens_per_s']:.0f} | {o['tokens_per_s']:.0f} | {s['step_ms']:.3f} | "
                  f"{o['step_ms']:.3f} | {o['tokens_per_s'] / s['tokens_per_s']:.2f}x |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)


if __name__ == "__main__":
    main()

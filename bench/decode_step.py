"""One decode step of a random gpt-oss checkpoint on the cuda backend, against the HBM roofline.

    python -m bench.decode_step                     # full 24-layer gpt-oss-20b shapes, MXFP4 experts
    python -m bench.decode_step --layers 2 --batches 1,64 --json out.json

The checkpoint is written once (values drawn on the GPU, `make_checkpoint(device="cuda")`)
and loaded the way the worker loads it (`load_model(path, backend="cuda")`). Each batch
size B runs B sequences of --context tokens, each decoding one token, with the block
tables the engine would hand over (sliding tables start with NO_BLOCK past the window).

Per B it prints: the step as the engine sees it (host planning + graph replay, synced
each step), the replay alone (CUDA events), the eager step (no graphs), tokens/s, and
for every B the memory-bound step of bench/roofline.py (weights of the experts the
batch is expected to hit + KV read, over the copy bandwidth measured in this run).
Issue 4's target is batch 1: step within 1.5x of that bound.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from bench.kernels import timed
from bench.roofline import copy_bandwidth, decode_bound
from kernels.decode_attention import decode_kernel
from kernels.pdl import pdl_enabled
from services.worker.model import ForwardBatch, load_model, make_checkpoint
from services.worker.model.batch import NO_BLOCK

BLOCK = 16


def random_checkpoint(preset: str = "20b", layers: int | None = None, path: str | None = None) -> str:
    """A random checkpoint of the preset's shapes (all its layers unless `layers`), written once, on the GPU."""
    path = path or f"/tmp/rose-bench/gpt-oss-{preset}-{layers or 'all'}-layers"
    overrides = {"num_hidden_layers": layers} if layers else {}
    return make_checkpoint(path, seed=1, preset=preset, device="cuda", **overrides)


def decode_batch(seqs: int, context: int, window: int, vocab: int) -> tuple[ForwardBatch, dict[str, int]]:
    """B sequences at `context` tokens decoding one more, and the blocks each pool needs."""
    pages = (context + BLOCK - 1) // BLOCK
    full = [list(range(s * pages, (s + 1) * pages)) for s in range(seqs)]
    # blocks wholly before the window are gone from the sliding pool, as the engine frees them
    first_kept = max(0, (context - window) // BLOCK)
    sliding = [[NO_BLOCK] * first_kept + list(range(s * pages + first_kept, (s + 1) * pages)) for s in range(seqs)]
    batch = ForwardBatch(
        token_ids=torch.randint(0, vocab, (seqs,)), positions=torch.full((seqs,), context - 1),
        query_lens=[1] * seqs, context_lens=[context] * seqs, block_tables={"full": full, "sliding": sliding})
    return batch, {"full": seqs * pages, "sliding": seqs * pages}


def time_steps(model, batch, kv, iters: int) -> list[float]:
    """Wall seconds per step, synchronised after each (the engine reads the logits every step)."""
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        model(batch, kv)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def time_replay(model, iters: int) -> float:
    """Median device seconds of a graph replay alone (no planning); the graphs hold one bucket per cache."""
    graphs = model.graphs
    step = graphs.captured[max(graphs.captured)] if graphs else None
    if step is None:
        return float("nan")
    return timed(step.graph.replay, iters)  # the GPU busy before each replay: the host's enqueue is not timed


def run(path: str, batches: list[int], context: int, iters: int) -> dict:
    bandwidth = copy_bandwidth("cuda")
    model = load_model(path, backend="cuda")
    c = model.config
    rows = []
    for seqs in batches:
        batch, blocks = decode_batch(seqs, context, c.sliding_window, c.vocab_size)
        kv = model.make_kv_cache(blocks, BLOCK)
        for k in kv.k + kv.v:
            k.normal_()
        model.cuda_graphs = True
        time_steps(model, batch, kv, 3)  # captures this bucket
        graph_step = statistics.median(time_steps(model, batch, kv, iters))
        replay = time_replay(model, iters)
        model.cuda_graphs = False
        time_steps(model, batch, kv, 2)
        eager_step = statistics.median(time_steps(model, batch, kv, max(3, iters // 4)))
        model.graphs = None
        del kv
        torch.cuda.empty_cache()
        bound = decode_bound(c, bandwidth, seqs, context, 2)
        rows.append(dict(batch=seqs, step_ms=graph_step * 1e3, replay_ms=replay * 1e3, eager_ms=eager_step * 1e3,
                         tokens_per_s=seqs / graph_step, bound_ms=bound.step_s * 1e3,
                         bound_bytes=bound.weight_bytes + bound.kv_bytes,
                         x_bound=graph_step / bound.step_s))
    return dict(bandwidth=bandwidth, layers=c.num_hidden_layers, context=context, rows=rows,
                device=torch.cuda.get_device_name(), pdl=pdl_enabled(),
                decode_attention=decode_kernel())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=None, help="checkpoint folder (default: a random one under /tmp)")
    parser.add_argument("--preset", default="20b", choices=("20b", "120b"))
    parser.add_argument("--layers", type=int, default=None, help="num_hidden_layers (default: the preset's)")
    parser.add_argument("--batches", default="1,8,64,256")
    parser.add_argument("--context", type=int, default=1024, help="tokens in each sequence's cache")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    start = time.perf_counter()
    path = random_checkpoint(args.preset, args.layers, args.checkpoint)
    print(f"checkpoint {path} ready in {time.perf_counter() - start:.1f} s")
    result = run(path, [int(b) for b in args.batches.split(",")], args.context, args.iters)
    print(f"{result['device']} (PDL {'on' if result['pdl'] else 'off'}, decode attention "
          f"{result['decode_attention']}), "
          f"{result['layers']} layers, context {result['context']}, "
          f"copy bandwidth {result['bandwidth'] / 1e9:.1f} GB/s")
    print("| batch | step ms (plan + replay) | replay ms | eager ms | tok/s | roofline ms | step / roofline |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in result["rows"]:
        print(f"| {r['batch']} | {r['step_ms']:.3f} | {r['replay_ms']:.3f} | {r['eager_ms']:.3f} | "
              f"{r['tokens_per_s']:.0f} | {r['bound_ms']:.3f} | {r['x_bound']:.2f}x |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)


if __name__ == "__main__":
    main()

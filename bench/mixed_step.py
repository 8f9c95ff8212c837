"""One engine step with prompt chunks and decode rows on the cuda backend: wall, host and GPU time.

    python -m bench.mixed_step                               # 24-layer gpt-oss-20b shapes, the default steps
    python -m bench.mixed_step --steps 64x8192,2048@6144,63x8192+1985@6144 --layers 2

Serving long prompts, most steps carry a chunk of some prompt (2048 tokens a step by
default, decode rows included) beside the running sequences' decode rows. Such a step
replays a decode graph where its chunks are short (cuda_graphs.as_decode_rows), else the
prefill graphs around eager attention (cuda_prefill_graphs.py; --prefill-graphs 0: all
eager; --prefill-attention fa2,fa3,auto: FlashInfer's kernel family for that attention,
kernels.attention.prefill_families). A step is a
'+'-joined list of parts: `BxC` is B sequences decoding one token at context C, `N@P` one
sequence's prompt chunk of N tokens after P cached ones. Per step it prints, medians
of --iters:
  wall    the step synchronised, as the engine reads its logits;
  host    until forward() returns, before the sync (what the host spends launching);
  gpu     the same step queued behind a sleep kernel, so the host is far ahead: CUDA
          events around it time the GPU's work without the host's gaps;
and the step's tokens. wall close to gpu: GPU-bound; wall close to host, above gpu:
host-bound (launches, planning); host above the sleep: forward() waited on the device.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from bench.decode_step import BLOCK, random_checkpoint
from services.worker.model import ForwardBatch, load_model
from services.worker.model.batch import NO_BLOCK

DEFAULT_STEPS = "64x8192,2048@0,2048@6144,63x8192+1985@6144,64x1024,255x1024+1793@0"
SLEEP_S = 0.2  # ahead of any step here: 24 eager layers launch in well under that


def parse_step(spec: str) -> list[tuple[int, int, int]]:
    """'63x8192+1985@6144' -> [(seqs, query_len, context)]: (63, 1, 8192), (1, 1985, 8129)."""
    parts = []
    for part in spec.split("+"):
        if "x" in part:
            seqs, context = (int(v) for v in part.split("x"))
            parts.append((seqs, 1, context))
        elif "@" in part:
            tokens, cached = (int(v) for v in part.split("@"))
            parts.append((1, tokens, cached + tokens))
        else:
            raise ValueError(f"step part {part!r} is neither BxC (decode rows) nor N@P (a prompt chunk)")
    return parts


def step_batch(spec: str, window: int, vocab: int) -> tuple[ForwardBatch, dict[str, int]]:
    """The ForwardBatch of a step spec, each sequence on blocks of its own, and the blocks each pool needs.

    Sliding tables hold NO_BLOCK for blocks wholly older than the window of a sequence's first
    new token, as the engine frees them.
    """
    query_lens, context_lens, positions, full, sliding = [], [], [], [], []
    next_block = 0
    for seqs, query, context in parse_step(spec):
        for _ in range(seqs):
            pages = -(-context // BLOCK)
            blocks = list(range(next_block, next_block + pages))
            next_block += pages
            start = context - query
            gone = max(0, (start - window) // BLOCK)
            query_lens.append(query)
            context_lens.append(context)
            positions.append(torch.arange(start, context))
            full.append(blocks)
            sliding.append([NO_BLOCK] * gone + blocks[gone:])
    tokens = sum(query_lens)
    batch = ForwardBatch(token_ids=torch.randint(0, vocab, (tokens,)), positions=torch.cat(positions),
                         query_lens=query_lens, context_lens=context_lens,
                         block_tables={"full": full, "sliding": sliding})
    return batch, {"full": next_block, "sliding": next_block}


def time_step(model, batch: ForwardBatch, kv, iters: int) -> dict:
    """Median wall, host and GPU ms of model(batch, kv) (see the module docstring)."""
    model(batch, kv)  # compiles, plans and (for graph steps) captures once
    torch.cuda.synchronize()
    wall, host, gpu = [], [], []
    cycles = int(SLEEP_S * 2e9)  # about SLEEP_S at an H100's ~2 GHz SM clock
    waited = []
    for _ in range(iters):
        start = time.perf_counter()
        model(batch, kv)
        host.append(time.perf_counter() - start)
        torch.cuda.synchronize()
        wall.append(time.perf_counter() - start)
    for _ in range(iters):
        torch.cuda._sleep(cycles)
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        start = time.perf_counter()
        model(batch, kv)
        waited.append(time.perf_counter() - start > SLEEP_S / 2)
        end.record()
        end.synchronize()
        gpu.append(begin.elapsed_time(end) / 1e3)
    ms = lambda xs: statistics.median(xs) * 1e3  # noqa: E731
    return dict(wall_ms=ms(wall), host_ms=ms(host), gpu_ms=ms(gpu), waited=any(waited))


def run(path: str, steps: list[str], iters: int, graphs: bool, tk_rows: list[int | None],
        piecewise: list[str], attention: list[str]) -> dict:
    from kernels.attention import SinkAttention, prefill_families

    model = load_model(path, backend="cuda")
    c = model.config
    wrappers = {}  # FlashInfer's prefill wrappers per kernel family, made once

    def wrapper(family: str) -> SinkAttention:
        if family not in wrappers:
            wrappers[family] = SinkAttention(c.num_attention_heads, c.num_key_value_heads, c.head_dim, BLOCK,
                                             model.dtype, model.device, backend=family)
        return wrappers[family]

    rows = []
    for spec, tk, pw, fa in ((spec, tk, pw, fa) for spec in steps for tk in tk_rows for pw in piecewise
                             for fa in attention):
        # as the backend reads ROSE_PREFILL_ATTENTION: steps with decode rows take model.attention, the others
        # chunk_attention
        os.environ["ROSE_PREFILL_ATTENTION"] = fa
        mixed, chunks = prefill_families(torch.cuda.get_device_capability(model.device))
        model.attention, model.chunk_attention = wrapper(mixed), wrapper(chunks)
        if tk is not None:  # from how many routed rows eager steps take triton-kernels' experts (cuda_moe)
            for layer in model.layers:
                layer["moe"].tk_eager_rows = tk if tk > 0 else 1 << 62
        os.environ["ROSE_PREFILL_GRAPHS"] = pw  # read at every step (cuda_prefill_graphs.prefill_graphs_enabled)
        batch, blocks = step_batch(spec, c.sliding_window, c.vocab_size)
        kv = model.make_kv_cache(blocks, BLOCK)
        for t in kv.k + kv.v:
            t.normal_()
        model.cuda_graphs = graphs
        model.graphs = None
        timing = time_step(model, batch, kv, iters)
        replayed = bool(model.graphs and model.graphs.captured)
        rows.append(dict(step=spec, tk_eager_rows=tk, prefill_graphs=pw, prefill_attention=fa,
                         tokens=len(batch.token_ids), seqs=batch.num_seqs, graph=replayed, **timing))
        print(f"{spec} (tk from {tk}, prefill graphs {pw}, {fa}): {timing['wall_ms']:.2f} ms wall, "
              f"{timing['host_ms']:.2f} host, {timing['gpu_ms']:.2f} gpu{' (graph)' if replayed else ''}"
              f"{' (forward waited on the device)' if timing['waited'] else ''}", flush=True)
        model.graphs = None
        del kv
        torch.cuda.empty_cache()
    return dict(device=torch.cuda.get_device_name(), layers=c.num_hidden_layers, rows=rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=None, help="checkpoint folder (default: a random one under /tmp)")
    parser.add_argument("--preset", default="20b", choices=("20b", "120b"))
    parser.add_argument("--layers", type=int, default=None, help="num_hidden_layers (default: the preset's)")
    parser.add_argument("--steps", default=DEFAULT_STEPS, help="comma-separated step specs (module docstring)")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--no-graphs", action="store_true", help="every step eager")
    parser.add_argument("--tk-eager-rows", default=None,
                        help="comma-separated: each step again with eager steps taking triton-kernels' experts from "
                             "this many routed rows (0: never); default ROSE_MOE_TK_EAGER_ROWS")
    parser.add_argument("--prefill-graphs", default="1", help="comma-separated ROSE_PREFILL_GRAPHS values: 1, 0 or "
                        "1,0 (each step with and without the piecewise graphs)")
    parser.add_argument("--prefill-attention", default=None,
                        help="comma-separated ROSE_PREFILL_ATTENTION values for the prompt chunks' attention: fa2, "
                             "fa3, auto (default: the environment's, else auto)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    path = random_checkpoint(args.preset, args.layers, args.checkpoint)
    tk_rows = [int(v) for v in args.tk_eager_rows.split(",")] if args.tk_eager_rows else [None]
    from kernels.attention import prefill_backend

    attention = args.prefill_attention.split(",") if args.prefill_attention else [prefill_backend()]
    result = run(path, args.steps.split(","), args.iters, not args.no_graphs, tk_rows, args.prefill_graphs.split(","),
                 attention)
    print(f"{result['device']}, {result['layers']} layers")
    print("| step | tokens | tk eager rows | prefill graphs | attention | decode graph | wall ms | host ms | gpu ms | "
          "forward waited |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in result["rows"]:
        tk = "default" if r["tk_eager_rows"] is None else r["tk_eager_rows"] or "never"
        print(f"| {r['step']} | {r['tokens']} | {tk} | {'on' if r['prefill_graphs'] != '0' else 'off'} | "
              f"{r['prefill_attention']} | {'yes' if r['graph'] else 'no'} | {r['wall_ms']:.2f} | "
              f"{r['host_ms']:.2f} | {r['gpu_ms']:.2f} | {'yes' if r['waited'] else 'no'} |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)


if __name__ == "__main__":
    main()

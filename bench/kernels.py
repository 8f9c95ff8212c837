"""Time each kernel at gpt-oss-20b shapes against torch eager, torch.compile and quack.

    python -m bench.kernels [--tokens 1,64,4096] [--json out.json]

Per kernel and token count: time (median of CUDA-graph replays where the callable can
be captured, else of an event-timed loop, marked `loop`), achieved bandwidth as a
share of the device-to-device copy bandwidth measured in the same run (bytes counted
as the fewest a kernel must move: every input read once, every output written once),
and speedups over torch eager / torch.compile of the reference / quack.
Inputs rotate over enough copies to exceed L2, so large sizes are not timed from cache.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

H, I, E, K, V = 2880, 2880, 32, 4, 201088  # noqa: E741 - gpt-oss-20b: hidden, inter, experts, top-k, vocab
L2_BYTES = 64 << 20
# GPU cycles of torch.cuda._sleep before each timed replay (~0.5 ms): long past the host's enqueue of the
# start event and the replay, so the GPU never waits on the host between the two events.
BUSY_CYCLES = 1_000_000


def busy_gpu() -> None:
    """Keep the GPU busy while the host enqueues what is timed next.

    Without it a replay's events also time the host's enqueue (the GPU records the start event at once,
    then idles until the replay arrives), short kernels losing the most: `python -m bench.timing_check`
    times both ways (docs/BENCHMARKS.md).
    """
    torch.cuda._sleep(BUSY_CYCLES)


def timed(fn, reps: int = 20, calls: int = 1, busy: bool = True) -> float:
    """Median seconds a call of `reps` runs of `fn` (which makes `calls` calls), each between two CUDA events.

    busy: busy_gpu() before each run, so the events time the GPU's work and not the host's enqueue
    (bench.timing_check times both).
    """
    times = []
    for _ in range(reps):
        if busy:
            busy_gpu()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3 / calls)
    return statistics.median(times)


def capture(fn_sets) -> torch.cuda.CUDAGraph:
    """One graph holding a call on every input set (warmed up outside the capture, replayed once)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for f in fn_sets:  # warm-up (compiles, allocator pools) outside the capture
            f()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for f in fn_sets:
            f()
    graph.replay()
    torch.cuda.synchronize()
    return graph


def _graph_time(fn_sets, reps=20) -> float:
    """Seconds per call: one graph holds a call on every input set, replayed `reps` times."""
    return timed(capture(fn_sets).replay, reps, len(fn_sets))


def _loop_time(fn_sets, reps=20) -> float:
    for f in fn_sets:
        f()
    torch.cuda.synchronize()

    def run_all():
        for f in fn_sets:
            f()

    return timed(run_all, reps, len(fn_sets))


def measure(fn_sets) -> tuple[float, str]:
    """(seconds per call, 'graph' or 'loop')."""
    try:
        return _graph_time(fn_sets), "graph"
    except Exception:  # noqa: BLE001 - not capturable (host syncs): time the plain loop
        torch.cuda.synchronize()
        return _loop_time(fn_sets), "loop"


def copy_bandwidth() -> tuple[float, float]:
    """Bytes/s of a 1 GiB device-to-device copy, counting bytes read plus written:
    (torch's copy_, a 16-byte-vector CuTeDSL row copy). The larger is the ceiling."""
    src = torch.randn(256 << 20, device="cuda")
    dst = torch.empty_like(src)
    t_torch, _ = measure([lambda: dst.copy_(src)])
    try:
        from kernels.moe_dispatch import gather_rows

        gather_rows(src.view(torch.bfloat16).view(-1, 4096)[:1], torch.zeros(1, dtype=torch.int32, device="cuda"))
    except ImportError as exc:
        print(f"vector copy unavailable ({exc}): the ceiling is torch's copy_")
        return 2 * src.numel() * 4 / t_torch, 0.0
    rows = src.view(torch.bfloat16).view(-1, 4096)
    out = dst.view(torch.bfloat16).view(-1, 4096)
    identity = torch.arange(rows.shape[0], device="cuda", dtype=torch.int32)
    t_vec, _ = measure([lambda: gather_rows(rows, identity, out)])
    assert torch.equal(out.view(torch.int16), rows.view(torch.int16))  # bitwise: random bits hold NaNs
    return 2 * src.numel() * 4 / t_torch, 2 * src.numel() * 4 / t_vec


def _copies(make, nbytes: int):
    """Enough independent input sets that together they overflow L2."""
    n = max(1, min(64, (2 * L2_BYTES) // max(nbytes, 1) + 1))
    return [make() for _ in range(n)]


def cases(tokens: int):
    """(name, bytes moved, make_inputs, ours, reference, quack-or-None) per kernel."""
    from kernels import embedding, moe_dispatch, rmsnorm, router, swiglu

    bf = dict(device="cuda", dtype=torch.bfloat16)
    out = []

    def rms_inputs():
        return torch.randn(tokens, H, **bf), torch.randn(tokens, H, **bf), torch.rand(H, **bf) + 0.5

    quack_rms = None
    try:
        import quack

        quack_rms = lambda x, r, w: quack.rmsnorm(x, w, eps=1e-5)  # noqa: E731
    except Exception as exc:  # noqa: BLE001
        print(f"quack unavailable: {type(exc).__name__}: {exc}"[:200])
    out.append(("rmsnorm", (2 * tokens * H + H) * 2, rms_inputs,
                lambda x, r, w: rmsnorm.rmsnorm(x, w, 1e-5),
                lambda x, r, w: rmsnorm.rmsnorm_reference(x, w, 1e-5)[0], quack_rms))
    out.append(("rmsnorm+residual", (4 * tokens * H + H) * 2, rms_inputs,
                lambda x, r, w: rmsnorm.rmsnorm(x, w, 1e-5, residual=r),
                lambda x, r, w: rmsnorm.rmsnorm_reference(x, w, 1e-5, residual=r), None))
    out.append(("swiglu", 3 * tokens * K * I * 2, lambda: (torch.randn(tokens * K, 2 * I, **bf) * 4,),
                lambda x: swiglu.swiglu(x), lambda x: swiglu.swiglu_reference(x), None))
    out.append(("router top-k", tokens * E * 2 + tokens * K * 8, lambda: (torch.randn(tokens, E, **bf),),
                lambda x: router.router_topk(x, K), lambda x: router.router_reference(x, K), None))

    def routed():
        ids = torch.rand(tokens, E, device="cuda").argsort(1)[:, :K].to(torch.int32).contiguous()
        return ids, moe_dispatch.route(ids, E), torch.randn(tokens, H, **bf), torch.randn(tokens * K, H, **bf), \
            torch.softmax(torch.randn(tokens, K, device="cuda"), -1)

    def torch_route(ids):
        flat = ids.reshape(-1)
        order = flat.argsort(stable=True)
        return order, torch.bincount(flat, minlength=E).cumsum(0)

    out.append(("moe route", tokens * K * 4 * 3, routed,
                lambda ids, r, x, ys, w: moe_dispatch.route(ids, E, out=r),
                lambda ids, r, x, ys, w: torch_route(ids), None))
    out.append(("moe dispatch", (tokens + tokens * K) * H * 2, routed,
                lambda ids, r, x, ys, w: moe_dispatch.dispatch(x, r),
                lambda ids, r, x, ys, w: x[r.src.long()], None))
    out.append(("moe combine", (tokens * K + tokens) * H * 2, routed,
                lambda ids, r, x, ys, w: moe_dispatch.combine(ys, r, w),
                lambda ids, r, x, ys, w: (ys[r.pos.long()].view(tokens, K, H).float() * w[..., None]).sum(1)
                .to(torch.bfloat16), None))
    out.append(("combine+rmsnorm+residual", ((tokens * K + 4 * tokens) * H + H) * 2, routed,
                lambda ids, r, x, ys, w: rmsnorm.combine_rmsnorm(ys, r.pos.view(tokens, K), w, x, x[0], 1e-5),
                lambda ids, r, x, ys, w: rmsnorm.combine_rmsnorm_reference(ys, r.pos.view(tokens, K), w, x, x[0],
                                                                           1e-5), None))
    if tokens <= moe_dispatch.ROUTE_TOPK_MAX_TOKENS:
        out.append(("router top-k + route", tokens * E * 2 + tokens * K * 4 * 4, lambda: (torch.randn(tokens, E, **bf),),
                    lambda x: moe_dispatch.route_topk(x, K),
                    lambda x: torch_route(router.router_reference(x, K)[0]), None))
    table = torch.randn(V, H, **bf)
    out.append(("embedding", 2 * tokens * H * 2, lambda: (torch.randint(0, V, (tokens,), device="cuda"),),
                lambda ids: embedding.embedding(table, ids), lambda ids: embedding.embedding_reference(table, ids),
                None))
    return out


def attention_cases(batch: int, context: int = 4096, xqa: bool = False):
    """Decode: `batch` sequences of one new token over `context` cached tokens (full layer).

    xqa: through kernels/decode_attention.py's XQA kernel instead of FlashInfer's sink wrapper.
    """
    from kernels.attention import SinkAttention
    from kernels.decode_attention import DecodeAttention
    from services.worker.model.batch import ForwardBatch
    from services.worker.model.paged_attention import AttentionPlan, paged_attention

    heads, kv_heads, dim, block = 64, 8, 64, 16
    pages = context // block
    num_blocks = batch * pages
    fb = ForwardBatch(
        token_ids=torch.zeros(batch, dtype=torch.int64), positions=torch.zeros(batch, dtype=torch.int64),
        query_lens=[1] * batch, context_lens=[context] * batch,
        block_tables={g: [list(range(s * pages, (s + 1) * pages)) for s in range(batch)] for g in ("full", "sliding")},
    )
    kc = torch.randn(num_blocks, block, kv_heads, dim, device="cuda", dtype=torch.bfloat16)
    vc = torch.randn_like(kc)
    q = torch.randn(batch, heads, dim, device="cuda", dtype=torch.bfloat16)
    sinks = torch.randn(heads, device="cuda")
    attn = (DecodeAttention if xqa else SinkAttention)(heads, kv_heads, dim, block, torch.bfloat16, "cuda")
    attn.plan(fb, [("full", None)])
    plan = AttentionPlan.build(fb, "full", None, block, torch.device("cuda"))
    k_new = kc.view(-1, kv_heads, dim)[plan.write_slots]  # rewrite what is there: the cache stays the same
    v_new = vc.view(-1, kv_heads, dim)[plan.write_slots]
    nbytes = 2 * kc.numel() * 2 + 2 * q.numel() * 2
    ours = lambda: attn.run("full", None, q, kc, vc, sinks)  # noqa: E731
    ref = lambda: paged_attention(q, k_new, v_new, kc, vc, plan, sinks, dim**-0.5)  # noqa: E731
    return nbytes, ours, ref


def run_attention(batches: list[int], bw: float) -> list[dict]:
    rows = []
    # all random inputs before any graph capture
    cases = [(b, xqa, attention_cases(b, xqa=xqa)) for xqa in (False, True) for b in batches]
    for batch, xqa, (nbytes, ours, ref) in cases:
        t, how = measure([ours])
        t_ref = _loop_time([ref], reps=5)
        name = "decode attention 4k ctx" + (" (XQA)" if xqa else "")
        row = {"kernel": name, "tokens": batch, "bytes": nbytes, "us": t * 1e6, "how": how,
               "bw_pct": 100 * nbytes / t / bw, "x_eager": t_ref / t}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


EXPERT_TOKENS = "1,8,64,256,4096"
EXPERT_SETS = 4  # routings per timed graph: the touched experts differ call to call, as in decode


def random_routing(tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(counts [E], offsets [E+1] int32) on the host: each token's top-K of E experts drawn at random."""
    counts = torch.bincount(torch.rand(tokens, E).argsort(1)[:, :K].reshape(-1), minlength=E)
    offsets = torch.zeros(E + 1, dtype=torch.int32)
    offsets[1:] = torch.cumsum(counts, 0)
    return counts, offsets


def run_experts(token_counts: list[int]) -> list[dict]:
    """The MoE expert GEMMs (gate_up then down, 20b: 32 experts, random top-4) by four paths.

    mxfp4 triton: kernels/moe_mxfp4.py on the checkpoint's packed experts, bias fused, device offsets;
    grouped: torch._grouped_mm over bf16 experts with device offsets (the cuda backend's path; its
    bias add is a separate op and not timed here);
    loop: one cuBLAS matmul per expert (host sync on the counts: the eager reference);
    mxfp4+grouped: the MXFP4 experts dequantized every step in torch eager, then grouped (what
    keeping experts packed costs without a fused MXFP4 GEMM).
    Reported: time, TFLOP/s of the useful products, and the share of the copy ceiling of the
    bytes each path must move: bf16 weights of the active experts for the bf16 paths;
    for mxfp4 triton, their fp4 blocks + scales + bias plus the activations in and out.
    """
    from kernels.moe_mxfp4 import grouped_mxfp4_linear
    from services.worker.model.cuda_moe import grouped_linear, grouped_linear_reference
    from services.worker.model.mxfp4 import dequantize, quantize

    bf = dict(device="cuda", dtype=torch.bfloat16)
    w_gu, w_d = torch.randn(E, 2 * I, H, **bf) / 50, torch.randn(E, H, I, **bf) / 50
    b_gu, b_d = torch.randn(E, 2 * I, **bf), torch.randn(E, H, **bf)
    q_gu, q_d = quantize(w_gu.float()), quantize(w_d.float())  # [E, out, K/32, 16], [E, out, K/32]
    rows = []
    inputs = []  # every random input before any graph capture (an aborted capture upsets the RNG)
    for tokens in token_counts:
        n = tokens * K
        sets = []
        for _ in range(EXPERT_SETS):
            counts, offsets = random_routing(tokens)
            sets.append((counts, offsets.cuda(), offsets[1:].cuda(), torch.randn(n, H, **bf), torch.randn(n, I, **bf)))
        inputs.append((tokens, n, sets))
    for tokens, n, sets in inputs:
        active = sum(int((c > 0).sum()) for c, *_ in sets) / len(sets)
        flops = 2 * n * (2 * I * H + H * I)
        wbytes = active * (2 * I * H + H * I) * 2
        # fp4 codes (half a byte) + one scale byte per 32 + bf16 bias, per active expert; activations
        # x in, gate_up out, h in, down out
        mx_bytes = active * ((2 * I * H + H * I) * (0.5 + 1 / 32) + (2 * I + H) * 2) + n * (H + 2 * I + I + H) * 2

        def paths(counts, offsets, ends, xs, hs):
            def mxfp4_triton():
                grouped_mxfp4_linear(xs, *q_gu, b_gu, offsets)
                grouped_mxfp4_linear(hs, *q_d, b_d, offsets)

            def grouped():
                grouped_linear(xs, w_gu, ends)
                grouped_linear(hs, w_d, ends)

            def loop():
                grouped_linear_reference(xs, w_gu, ends)
                grouped_linear_reference(hs, w_d, ends)

            def mxfp4_grouped():
                grouped_linear(xs, dequantize(*q_gu, torch.bfloat16), ends)
                grouped_linear(hs, dequantize(*q_d, torch.bfloat16), ends)

            return {"mxfp4 triton": mxfp4_triton, "grouped": grouped, "loop": loop, "mxfp4+grouped": mxfp4_grouped}

        fns = [paths(*s) for s in sets]
        times = {}
        for name in fns[0]:
            sets_of = [f[name] for f in fns] if name in ("mxfp4 triton", "grouped") else [fns[0][name]]
            times[name] = measure(sets_of)
        for name, (t, how) in times.items():
            nbytes = mx_bytes if name == "mxfp4 triton" else wbytes
            row = {"kernel": f"experts {name}", "tokens": tokens, "us": t * 1e6, "how": how,
                   "tflops": flops / t / 1e12, "weight_bw_pct": 100 * nbytes / t / COPY_BW[0]}
            if name == "mxfp4 triton":
                row["x_grouped"] = times["grouped"][0] / t
                row["x_dequant"] = times["mxfp4+grouped"][0] / t
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def expert_table(rows: list[dict]) -> str:
    """The expert GEMM rows: speedups of the MXFP4 kernel over the bf16 grouped path and over
    dequantize-then-grouped in eager."""
    fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    lines = ["| path | tokens | time (us) | timed by | TFLOP/s | % copy BW | x grouped bf16 | x dequant+grouped |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['kernel']} | {r['tokens']} | {r['us']:.1f} | {r['how']} | {r['tflops']:.1f} | "
                     f"{r['weight_bw_pct']:.0f} | {fmt(r.get('x_grouped'))} | {fmt(r.get('x_dequant'))} |")
    return "\n".join(lines)


COPY_BW = [0.0]


def run_model(path: str = "/tmp/rose-bench/gpt-oss-20b-2layer") -> list[dict]:
    """One forward step of a 2-layer model with gpt-oss-20b shapes: torch bf16 vs the cuda backend.

    Steps: decode of 64 sequences at 1024 cached tokens, and a 4096-token prefill of one
    sequence. Timed as the engine sees it (host planning included), median of 5 loop runs.
    """
    from services.worker.model import ForwardBatch, load_model, make_checkpoint

    make_checkpoint(path, seed=1, preset="20b", num_hidden_layers=2)
    block = 16
    steps = {}
    for name, seqs, ctx, q in (("decode 64x1k", 64, 1024, 1), ("prefill 4096", 1, 4096, 4096)):
        pages = ctx // block
        steps[name] = ForwardBatch(
            token_ids=torch.randint(0, 200000, (seqs * q,)),
            positions=torch.cat([torch.arange(ctx - q, ctx) for _ in range(seqs)]),
            query_lens=[q] * seqs, context_lens=[ctx] * seqs,
            block_tables={g: [list(range(s * pages, (s + 1) * pages)) for s in range(seqs)]
                          for g in ("full", "sliding")},
        ), seqs * pages
    rows, times = [], {}
    for backend in ("torch", "cuda"):
        model = load_model(path, backend=backend, device="cuda", dtype=torch.bfloat16)
        for name, (batch, blocks) in steps.items():
            kv = model.make_kv_cache({"full": blocks, "sliding": blocks}, block)
            times[backend, name] = _loop_time([lambda m=model, b=batch, c=kv: m(b, c)], reps=5)
        del model
        torch.cuda.empty_cache()
    for name in steps:
        row = {"kernel": f"model step {name}", "tokens": steps[name][0].token_ids.numel(),
               "us": times["cuda", name] * 1e6, "how": "loop", "x_eager": times["torch", name] / times["cuda", name]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def run(token_counts: list[int], attention: bool = False, kernels: bool = True, experts: bool = False,
        model: bool = False, expert_tokens: list[int] | None = None) -> list[dict]:
    bw_torch, bw_vec = copy_bandwidth()
    bw = max(bw_torch, bw_vec)
    COPY_BW[0] = bw
    print(f"device: {torch.cuda.get_device_name()}  copy bandwidth (read+write, 1 GiB): torch copy_ "
          f"{bw_torch / 1e12:.2f} TB/s, 16-byte vector copy {bw_vec / 1e12:.2f} TB/s; % below are of "
          f"{bw / 1e12:.2f}")
    rows = []
    if attention:
        rows += run_attention([1, 64], bw)
    if experts:
        rows += run_experts(expert_tokens or token_counts)
    if model:
        rows += run_model()
    for tokens in token_counts if kernels else []:
        for name, nbytes, make, ours, ref, quack_fn in cases(tokens):
            sets = _copies(make, nbytes)
            row = {"kernel": name, "tokens": tokens, "bytes": nbytes}
            t, how = measure([lambda a=a: ours(*a) for a in sets])
            row.update(us=t * 1e6, how=how, bw_pct=100 * nbytes / t / bw)
            t_eager, _ = measure([lambda a=a: ref(*a) for a in sets])
            row["x_eager"] = t_eager / t
            try:
                comp = torch.compile(ref, dynamic=False)
                t_comp, _ = measure([lambda a=a: comp(*a) for a in sets])
                row["x_compile"] = t_comp / t
            except Exception as exc:  # noqa: BLE001
                row["x_compile"] = None
                print(f"{name} {tokens}: torch.compile failed: {type(exc).__name__}: {exc}"[:200])
            if quack_fn is not None:
                try:
                    t_q, _ = measure([lambda a=a: quack_fn(*a) for a in sets])
                    row["x_quack"] = t_q / t
                except Exception as exc:  # noqa: BLE001
                    print(f"{name} {tokens}: quack failed: {type(exc).__name__}: {exc}"[:200])
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def table(rows: list[dict]) -> str:
    fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    lines = ["| kernel | tokens | time (us) | timed by | % copy BW | x eager | x compile | x quack |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if "tflops" in r:  # expert GEMMs: expert_table
            continue
        bw_pct = f"{r['bw_pct']:.0f}" if "bw_pct" in r else "-"
        lines.append(f"| {r['kernel']} | {r['tokens']} | {r['us']:.1f} | {r['how']} | {bw_pct} | "
                     f"{fmt(r['x_eager'])} | {fmt(r.get('x_compile'))} | {fmt(r.get('x_quack'))} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", default="1,64,4096")
    parser.add_argument("--json", default="")
    parser.add_argument("--attention", action="store_true", help="also time FlashInfer decode attention")
    parser.add_argument("--experts", action="store_true", help="also time the MoE expert GEMM paths")
    parser.add_argument("--expert-tokens", default=EXPERT_TOKENS, help="token counts of the --experts rows")
    parser.add_argument("--triton-kernels", action="store_true",
                        help="also time the MoE experts against triton-kernels' matmul_ogs (bench/triton_kernels_moe.py)")
    parser.add_argument("--model", action="store_true", help="also time a 2-layer 20b-shaped model step")
    parser.add_argument("--no-kernels", action="store_true", help="skip the CuTeDSL kernels")
    args = parser.parse_args()
    rows = run([int(t) for t in args.tokens.split(",")], attention=args.attention, kernels=not args.no_kernels,
               experts=args.experts, model=args.model,
               expert_tokens=[int(t) for t in args.expert_tokens.split(",")])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    print(table(rows))
    if args.experts:
        print(expert_table([r for r in rows if "tflops" in r]))
    if args.triton_kernels:  # after the tables above, so a missing triton_kernels costs nothing printed
        from bench import triton_kernels_moe

        print(triton_kernels_moe.table(triton_kernels_moe.run([int(t) for t in args.expert_tokens.split(",")])))


if __name__ == "__main__":
    main()

"""Where a cuda-backend decode step spends its time (host vs device), on the 2-layer 20b model.

    python -m bench.profile_step
"""

import time

import torch

from services.worker.model import ForwardBatch, load_model, make_checkpoint


def main(path: str = "/tmp/rose-bench/gpt-oss-20b-2layer") -> None:
    from kernels.rmsnorm import rmsnorm

    x = torch.randn(1, 2880, device="cuda", dtype=torch.bfloat16)
    rmsnorm(x, None, 1e-5)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(200):
        rmsnorm(x, None, 1e-5)
    host = (time.perf_counter() - t) / 200
    torch.cuda.synchronize()
    print(f"host time per CuTeDSL rmsnorm call: {host * 1e6:.1f} us")

    make_checkpoint(path, seed=1, preset="20b", num_hidden_layers=2)
    model = load_model(path, backend="cuda")
    seqs, ctx, block = 64, 1024, 16
    pages = ctx // block
    batch = ForwardBatch(
        token_ids=torch.randint(0, 200000, (seqs,)), positions=torch.full((seqs,), ctx - 1),
        query_lens=[1] * seqs, context_lens=[ctx] * seqs,
        block_tables={g: [list(range(s * pages, (s + 1) * pages)) for s in range(seqs)] for g in ("full", "sliding")},
    )
    kv = model.make_kv_cache({"full": seqs * pages, "sliding": seqs * pages}, block)
    for _ in range(2):
        model(batch, kv)
    torch.cuda.synchronize()
    t = time.perf_counter()
    with torch.inference_mode():  # the model plans inside inference mode too
        model.attention.reset()
        model.attention.plan(batch, [("full", None), ("sliding", 128)])
    torch.cuda.synchronize()
    print(f"attention plan (2 wrappers): {(time.perf_counter() - t) * 1e6:.0f} us")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        model(batch, kv)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=60))
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=12, max_name_column_width=60))


if __name__ == "__main__":
    main()

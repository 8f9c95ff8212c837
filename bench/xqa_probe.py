"""FlashInfer's XQA decode kernel alone at one sequence: us per call, unsplit (sm_count=1, as rose runs it)
and with its multi-block split, full attention and a 128-key window, at 128 / 1024 / 4096 keys.

    python bench/xqa_probe.py      (a GPU host with FlashInfer; keys stay in L2 over the 50 calls of a graph)
"""
import torch
from flashinfer import xqa

torch.manual_seed(0)
heads, kvh, d, page = 64, 8, 64, 16
for ctx in (128, 1024, 4096):
    pages = ctx // page
    k = torch.randn(pages + 1, page, kvh, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    table = torch.arange(pages, dtype=torch.int32, device="cuda").view(1, pages)
    lengths = torch.full((1, 1), ctx, dtype=torch.int32, device="cuda").view(torch.uint32)
    q = torch.randn(1, 1, heads, d, device="cuda", dtype=torch.bfloat16)
    out = torch.empty_like(q)
    scratch = torch.zeros(16 << 20, dtype=torch.uint8, device="cuda")
    sem = torch.zeros(64, dtype=torch.int32, device="cuda").view(torch.uint32)
    sinks = torch.randn(kvh, heads // kvh, device="cuda")
    for window in (0, 128):
        for sm in (1, 132):
            fn = lambda: xqa(q, k, v, table, lengths, out, scratch, sem, kvh, page, sinks=sinks,
                             sliding_win_size=window, kv_layout="NHD", sm_count=sm)
            for _ in range(3):
                fn()
            torch.cuda.synchronize()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                for _ in range(50):
                    fn()
            s, e = torch.cuda.Event(True), torch.cuda.Event(True)
            g.replay(); torch.cuda.synchronize()
            s.record(); g.replay(); e.record(); torch.cuda.synchronize()
            print(f"ctx {ctx} window {window} sm_count {sm}: {s.elapsed_time(e) * 1e3 / 50:.1f} us", flush=True)

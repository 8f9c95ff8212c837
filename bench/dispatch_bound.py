"""What the MoE dispatch's memory traffic can reach: one row read, k rows written.

    python -m bench.dispatch_bound [--tokens 4096] [--draws 3] [--json out.json]

bench.kernels rates `moe dispatch` against a copy (one byte written per byte read); the dispatch
writes k = 4 bytes per byte it reads. This times, at gpt-oss-20b's hidden size, the same bytes
moved several ways, each as a share of the copy ceiling measured in the same run:
  dispatch, routed     kernels.moe_dispatch.dispatch on random top-4 routing (the kernel the model runs:
                       bulk copies, one CTA a token row)
  ..., a vector a thread  its other form: one 16-byte vector a thread (bulk=False)
  ..., out allocated a call  as the model calls it (no `out`: torch allocates the rows each call)
  dispatch, in order   the bulk kernel with every token's k rows next to each other (no scatter)
  gather by src        kernels.moe_dispatch.gather_rows over the sorted slots (each row read k times)
  torch broadcast      torch copying x into [T, k, H] (contiguous, torch's own kernel)
  torch zero_          only the k*T written rows (write bandwidth alone)
If the in-order and broadcast rows sit where the routed one does, the write-heavy mix, not the
scatter, is what holds the dispatch below the copy ceiling. Each row prints its draws in order.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from bench.kernels import H, K, E, _copies, copy_bandwidth, measure


def cases(tokens: int) -> list[tuple[str, int, object, object]]:
    """(name, bytes, make_inputs, fn) per way; bytes as bench.kernels counts the dispatch's."""
    from kernels import moe_dispatch

    bf = dict(device="cuda", dtype=torch.bfloat16)
    moved = (tokens + tokens * K) * H * 2

    def routed():
        ids = torch.rand(tokens, E, device="cuda").argsort(1)[:, :K].to(torch.int32).contiguous()
        return torch.randn(tokens, H, **bf), moe_dispatch.route(ids, E), torch.empty(tokens * K, H, **bf)

    def in_order():
        x, r, out = routed()
        slots = torch.arange(tokens * K, dtype=torch.int32, device="cuda")
        return x, moe_dispatch.Routing(r.counts, r.offsets, slots, slots // K, K), out

    return [
        ("dispatch, routed", moved, routed, lambda x, r, out: moe_dispatch.dispatch(x, r, out)),
        ("dispatch, routed, a vector a thread", moved, routed,
         lambda x, r, out: moe_dispatch.dispatch(x, r, out, bulk=False)),
        ("dispatch, routed, out allocated a call", moved, routed, lambda x, r, out: moe_dispatch.dispatch(x, r)),
        ("dispatch, routed, a vector a thread, out allocated a call", moved, routed,
         lambda x, r, out: moe_dispatch.dispatch(x, r, bulk=False)),
        ("dispatch, in order", moved, in_order, lambda x, r, out: moe_dispatch.dispatch(x, r, out)),
        ("gather by src", moved, routed, lambda x, r, out: moe_dispatch.gather_rows(x, r.src, out)),
        ("torch broadcast", moved, routed,
         lambda x, r, out: out.view(tokens, K, H).copy_(x[:, None].expand(tokens, K, H))),
        ("torch zero_ (writes only)", tokens * K * H * 2, routed, lambda x, r, out: out.zero_()),
    ]


def check(tokens: int) -> None:
    """Every form of the dispatch, in both layouts, puts every token's row where its routing says."""
    for name, _, make, fn in cases(tokens):
        if name.startswith("dispatch"):
            x, r, out = make()
            got = fn(x, r, out)
            expected = torch.empty_like(out)
            expected[r.pos.long()] = x.repeat_interleave(K, 0)
            assert torch.equal(got, expected), name


def run(token_counts: list[int], draws: int) -> tuple[float, list[dict]]:
    """Each way timed on `draws` fresh sets of inputs (new routing, new buffers): one draw's figure moved by
    ten points between calls (docs/BENCHMARKS.md), so the spread is printed with the median."""
    ceiling = max(copy_bandwidth())
    rows = []
    for tokens in token_counts:
        check(tokens)
        for name, nbytes, make, fn in cases(tokens):
            times = []
            for _ in range(draws):
                sets = _copies(make, nbytes)
                seconds, how = measure([lambda s=s: fn(*s) for s in sets])
                times.append(seconds)
                del sets
                torch.cuda.empty_cache()
            pct = [100 * nbytes / t / ceiling for t in times]  # in draw order
            rows.append(dict(way=name, tokens=tokens, bytes=nbytes, us=statistics.median(times) * 1e6, how=how,
                             bw_pct=statistics.median(pct), bw_pct_min=min(pct), bw_pct_max=max(pct), draws=pct))
    return ceiling, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", default="4096")
    parser.add_argument("--draws", type=int, default=3, help="fresh input sets a way is timed on")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    ceiling, rows = run([int(t) for t in args.tokens.split(",")], args.draws)
    print(f"{torch.cuda.get_device_name()}: copy ceiling {ceiling / 1e12:.2f} TB/s (read + write); medians of "
          f"{args.draws} draws")
    print("| way | tokens | MB moved | time (us) | timed by | % copy BW | min-max % | draws, in order |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        draws = " ".join(f"{p:.0f}" for p in r["draws"])
        print(f"| {r['way']} | {r['tokens']} | {r['bytes'] / 1e6:.1f} | {r['us']:.1f} | {r['how']} | "
              f"{r['bw_pct']:.0f} | {r['bw_pct_min']:.0f}-{r['bw_pct_max']:.0f} | {draws} |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(dict(device=torch.cuda.get_device_name(), ceiling=ceiling, rows=rows), fh, indent=2)


if __name__ == "__main__":
    main()

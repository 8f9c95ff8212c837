"""RMSNorm rows-per-warp variants at gpt-oss-20b hidden size: time and % of the copy ceiling.

    python -m bench.rmsnorm_rows
"""

import torch

from bench.kernels import H, _copies, copy_bandwidth, measure
from kernels.rmsnorm import rmsnorm


def main() -> None:
    bw = max(copy_bandwidth())
    print(f"copy ceiling {bw / 1e12:.2f} TB/s")
    print("| tokens | residual | rows/warp | time (us) | % copy BW |")
    print("| --- | --- | --- | --- | --- |")
    for tokens in (1, 64, 4096):
        for fused in (False, True):
            nbytes = ((4 if fused else 2) * tokens * H + H) * 2

            def make():
                return (torch.randn(tokens, H, device="cuda", dtype=torch.bfloat16),
                        torch.randn(tokens, H, device="cuda", dtype=torch.bfloat16),
                        torch.rand(H, device="cuda", dtype=torch.bfloat16) + 0.5)

            sets = _copies(make, nbytes)
            for rpw in (1, 2, 4):
                fns = [lambda a=a: rmsnorm(a[0], a[2], 1e-5, residual=a[1] if fused else None, rows_per_warp=rpw)
                       for a in sets]
                t, _ = measure(fns)
                print(f"| {tokens} | {fused} | {rpw} | {t * 1e6:.1f} | {100 * nbytes / t / bw:.0f} |", flush=True)


if __name__ == "__main__":
    main()

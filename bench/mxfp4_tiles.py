"""Tile sweep of the MXFP4 grouped GEMM (kernels/moe_mxfp4.py) at prefill sizes, gpt-oss-20b shapes.

    python -m bench.mxfp4_tiles [--tokens 1024,4096]

For each token count (routed rows = 4x: top-4 of 32 experts, drawn at random) it times gate_up
(2880 -> 5760, SwiGLU fused) and down (2880 -> 2880) with each candidate tile and prints
microseconds and TFLOP/s; the row marked `*` is what TILE_CONFIGS picks today. Triton only:
it runs on a GPU host without CuTeDSL or FlashInfer.
"""

from __future__ import annotations

import argparse
import dataclasses

import torch

from bench.kernels import measure, random_routing
from kernels.moe_mxfp4 import TileConfig, grouped_mxfp4_linear, tile_config

HIDDEN, INTER, EXPERTS, TOP_K = 2880, 2880, 32, 4
CANDIDATES = [
    TileConfig(64, 128, 128, 8, 3),
    TileConfig(128, 128, 64, 4, 4),
    TileConfig(128, 128, 128, 8, 3),
    TileConfig(128, 128, 64, 8, 4),
    TileConfig(128, 256, 64, 8, 3),
    TileConfig(64, 256, 128, 8, 3),
    TileConfig(128, 64, 128, 4, 4),
    TileConfig(64, 128, 64, 4, 4),
    TileConfig(128, 128, 128, 4, 3),
    TileConfig(256, 128, 64, 8, 3),
    # the weight as the MMA's left operand (swap_ab): its widened tile can stay in registers
    TileConfig(64, 128, 64, 4, 4, swap_ab=True),
    TileConfig(128, 128, 64, 4, 4, swap_ab=True),
    TileConfig(64, 128, 128, 4, 3, swap_ab=True),
    TileConfig(128, 128, 128, 8, 3, swap_ab=True),
    TileConfig(64, 256, 64, 8, 3, swap_ab=True),
    TileConfig(128, 256, 64, 8, 3, swap_ab=True),
    TileConfig(32, 128, 128, 4, 4, swap_ab=True),
]


def _label(cfg: TileConfig) -> str:
    return str(dataclasses.astuple(cfg)[:5]) + (" swap" if cfg.swap_ab else "")


def random_experts(n_out: int, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random packed codes, scales near 2**0 (e8m0 125..129) and bias, as a checkpoint stores them."""
    blocks = torch.randint(0, 256, (EXPERTS, n_out, k // 32, 16), dtype=torch.uint8, device="cuda")
    scales = torch.randint(125, 130, (EXPERTS, n_out, k // 32), dtype=torch.uint8, device="cuda")
    bias = torch.randn(EXPERTS, n_out, device="cuda").to(torch.bfloat16)
    return blocks, scales, bias


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", default="1024,4096")
    args = parser.parse_args()
    gate_up, down = random_experts(2 * INTER, HIDDEN), random_experts(HIDDEN, INTER)
    print(f"{torch.cuda.get_device_name()}: MXFP4 grouped GEMM, {EXPERTS} experts, top-{TOP_K}, K {HIDDEN}")
    print("| tokens | tile (BM, BN, BK, warps, stages) [swap_ab] | gate_up+SwiGLU us | down us | sum us | TFLOP/s |")
    print("| --- | --- | --- | --- | --- | --- |")
    for tokens in (int(t) for t in args.tokens.split(",")):
        n = tokens * TOP_K
        offsets = random_routing(tokens)[1].cuda()
        x = torch.randn(n, HIDDEN, device="cuda").to(torch.bfloat16)
        h = torch.randn(n, INTER, device="cuda").to(torch.bfloat16)
        flops = 2 * n * HIDDEN * (2 * INTER + HIDDEN)
        picked = tile_config(n)
        for cfg in CANDIDATES:
            try:
                up = 1e6 * measure([lambda: grouped_mxfp4_linear(x, *gate_up, offsets, config=cfg,
                                                                 swiglu=(1.702, 7.0))])[0]
                dn = 1e6 * measure([lambda: grouped_mxfp4_linear(h, *down, offsets, config=cfg)])[0]
            except Exception as exc:  # a tile past the SM's shared memory fails to launch: say so, go on
                print(f"| {tokens} | {_label(cfg)} | failed: {type(exc).__name__} | | | |")
                continue
            mark = " *" if cfg == picked else ""
            print(f"| {tokens} | {_label(cfg)}{mark} | {up:.1f} | {dn:.1f} | {up + dn:.1f} | "
                  f"{flops / (up + dn) / 1e6:.1f} |")


if __name__ == "__main__":
    main()

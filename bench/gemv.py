"""Tile sweeps of the decode GEMVs at gpt-oss-20b shapes: which launch shape streams weights fastest.

    python -m bench.gemv [--tokens 1,2,4] [--json out.json]

MXFP4 experts: the CuTeDSL decode GEMVs (kernels/mxfp4_mma.py's tensor-core kernel, and
kernels/mxfp4_gemv.py's FMA kernel per rows-per-CTA) and the Triton tensor-core decode tile
beside them: gate_up (2880 -> 5760, alone and with the SwiGLU fused
in its store) and down (2880 -> 2880) over tokens x 4 routed rows of 32 experts. Dense bf16 (kernels/gemv.py) against cuBLAS (F.linear) on the
attention's QKV (2880 -> 5120) and o_proj (4096 -> 2880) and the router (2880 -> 32), per
config at one row and the best three at 2 and 4 rows. Each figure is the median of CUDA-graph
replays over inputs that overflow L2, with its bytes (weights read once, activations in and
out) as a share of the copy bandwidth measured in the same run; the MMA kernel's "memory floor"
row (its math compiled out) shows what the stream alone takes. Past 16 routed rows (`--tokens 8,64`)
the MMA kernel runs with several routed rows of an expert a tile (`cols`, per stages) against the
Triton tile the grouped GEMM picks there. The best config of each case is printed last.
"""

from __future__ import annotations

import argparse
import itertools
import json
from typing import NamedTuple

import torch
import torch.nn.functional as F

from bench.kernels import EXPERT_SETS, E, H, I, K, _copies, copy_bandwidth, measure, random_routing

DENSE = {"qkv": (5120, H), "o_proj": (H, 4096), "router": (E, H)}  # (out, in)


class Cute(NamedTuple):
    """A CuTeDSL GEMV launch: the tensor-core kernel (on the repacked weights) or the FMA one, rows_per_cta,
    and the kernels.mxfp4_mma settings (module constants, read at each launch) the MMA kernel runs with."""

    mma: bool
    rows_per_cta: int
    settings: dict | None = None
    cols: int = 1  # the MMA kernel's routed rows a tile


def mma_settings(quads: int, ctas: int, stages: int, math: bool = True) -> dict:
    return {"QUADS_PER_WARP": quads, "CTAS_PER_SM": ctas, "STAGES": stages, "MATH": math}


def mxfp4_paths(n: int):
    """(label, config) of the MXFP4 launches compared at n routed rows: the tensor-core GEMV (past GEMV_ROWS
    also with several routed rows a tile, per cols and stages), the FMA GEMV per rows per CTA, the Triton tile."""
    from kernels.moe_mxfp4 import GEMV_ROWS, TILE_CONFIGS, tile_config

    if n > GEMV_ROWS:
        for cols, ctas, stages in ((8, 2, 2), (8, 3, 2), (8, 1, 4), (8, 2, 3), (4, 2, 2), (4, 3, 2)):
            yield (f"cute mma {cols} cols {ctas} CTAs/SM {stages} stages",
                   Cute(True, 16, {"COLS_CTAS_PER_SM": ctas, "COLS_STAGES": stages}, cols))
        yield "triton tile", tile_config(n)
        return
    for quads, ctas, stages in ((3, 3, 2), (3, 2, 2), (3, 2, 3), (3, 1, 4), (6, 3, 2), (6, 2, 3)):
        label = f"cute mma {quads} quads/warp {ctas} CTAs/SM {stages} stages"
        yield label, Cute(True, 16, mma_settings(quads, ctas, stages))
    # not a result: what the stream alone allows
    yield "cute mma memory floor (no math)", Cute(True, 16, mma_settings(3, 3, 2, math=False))
    for rows_per_cta in (4, 8):
        yield f"cute fma rows/CTA {rows_per_cta}", Cute(False, rows_per_cta)
    yield "triton decode tile", TILE_CONFIGS[0][1]


def sweep_mxfp4(tokens_list: list[int], copy_bw: float) -> list[dict]:
    from kernels import mxfp4_mma
    from kernels.moe_mxfp4 import grouped_mxfp4_linear
    from kernels.mxfp4_gemv import mxfp4_gemv
    from kernels.mxfp4_mma import repack
    from services.worker.model.mxfp4 import quantize

    bf = dict(device="cuda", dtype=torch.bfloat16)
    projections = {}
    for name, (n_out, k) in {"gate_up": (2 * I, H), "down": (H, I)}.items():
        blocks, scales = quantize(torch.randn(E, n_out, k, device="cuda") / 50)
        projections[name] = (blocks, scales, torch.randn(E, n_out, **bf), n_out, k, repack(blocks))
    rows = []
    for tokens in tokens_list:
        n = tokens * K
        routings = []
        for _ in range(EXPERT_SETS):
            counts, offsets = random_routing(tokens)
            routings.append((int((counts > 0).sum()), offsets.cuda()))
        for (name, (blocks, scales, bias, n_out, k, repacked)), swiglu in (
            (("gate_up", projections["gate_up"]), None), (("gate_up", projections["gate_up"]), (1.702, 7.0)),
            (("down", projections["down"]), None),
        ):
            x = torch.randn(n, k, **bf)
            active = sum(a for a, _ in routings) / len(routings)
            nbytes = active * n_out * (k // 2 + k // 32 + 2) + n * (k + (n_out // 2 if swiglu else n_out)) * 2
            label = name + ("+swiglu" if swiglu else "")
            for path, config in mxfp4_paths(n):
                settings = config.settings if isinstance(config, Cute) else None  # read at each launch
                if isinstance(config, Cute):
                    weights = repacked if config.mma else blocks
                    fns = [lambda o=o: mxfp4_gemv(x, weights, scales, bias, o, swiglu=swiglu, repacked=config.mma,
                                                  rows_per_cta=config.rows_per_cta, cols=config.cols)
                           for _, o in routings]
                else:
                    fns = [lambda o=o: grouped_mxfp4_linear(x, blocks, scales, bias, o, config=config, swiglu=swiglu)
                           for _, o in routings]
                saved = {key: getattr(mxfp4_mma, key) for key in settings or {}}
                for key, value in (settings or {}).items():
                    setattr(mxfp4_mma, key, value)
                t, _ = measure(fns)
                for key, value in saved.items():
                    setattr(mxfp4_mma, key, value)
                row = {"case": f"mxfp4 {label}", "rows": n, "config": path, "us": t * 1e6,
                       "bw_pct": 100 * nbytes / t / copy_bw, "floor": bool(settings) and not settings.get("MATH", True)}
                rows.append(row)
                print(json.dumps(row), flush=True)
    return rows


def gemv_configs():
    from kernels.gemv import GemvConfig

    for bn, bk, warps in itertools.product((2, 4, 8), (512, 1024), (2, 4, 8)):
        yield GemvConfig(bn, bk, warps)


def sweep_dense(copy_bw: float) -> list[dict]:
    from kernels.gemv import gemv

    bf = dict(device="cuda", dtype=torch.bfloat16)
    rows = []
    for name, (n_out, k) in DENSE.items():
        weights = _copies(lambda: (torch.randn(n_out, k, **bf) / 50, torch.randn(n_out, **bf)), n_out * k * 2)
        best = []
        for m in (1, 2, 4):
            x = torch.randn(m, k, **bf)
            nbytes = n_out * k * 2 + n_out * 2 + m * (k + n_out) * 2
            t_ref, _ = measure([lambda w=w, b=b: F.linear(x, w, b) for w, b in weights])
            ref = {"case": f"cublas {name}", "rows": m, "config": "F.linear", "us": t_ref * 1e6,
                   "bw_pct": 100 * nbytes / t_ref / copy_bw}
            rows.append(ref)
            print(json.dumps(ref), flush=True)
            timed = []
            for config in (gemv_configs() if m == 1 else best):
                t, _ = measure([lambda w=w, b=b: gemv(x, w, b, config=config) for w, b in weights])
                timed.append((t, config))
                row = {"case": f"gemv {name}", "rows": m, "config": _short(config), "us": t * 1e6,
                       "bw_pct": 100 * nbytes / t / copy_bw, "x_cublas": t_ref / t}
                rows.append(row)
                print(json.dumps(row), flush=True)
            if m == 1:
                best = [c for _, c in sorted(timed, key=lambda tc: tc[0])[:3]]
    return rows


def _short(config) -> str:
    return "/".join(str(v) for v in vars(config).values() if not isinstance(v, bool))


def best_table(rows: list[dict]) -> str:
    lines = ["| case | rows | best config | us | % copy BW | x cuBLAS |", "| --- | --- | --- | --- | --- | --- |"]
    keyed = {}
    for r in rows:
        if r.get("floor"):  # computes nothing
            continue
        key = (r["case"], r["rows"])
        if key not in keyed or r["us"] < keyed[key]["us"]:
            keyed[key] = r
    for (case, n), r in keyed.items():
        x = f"{r['x_cublas']:.2f}" if "x_cublas" in r else "-"
        lines.append(f"| {case} | {n} | {r['config']} | {r['us']:.1f} | {r['bw_pct']:.0f} | {x} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", default="1,2,4", help="decode tokens of the MXFP4 sweep (rows = tokens x 4)")
    parser.add_argument("--no-dense", action="store_true")
    parser.add_argument("--no-mxfp4", action="store_true")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch_bw, vec_bw = copy_bandwidth()
    copy_bw = max(torch_bw, vec_bw)
    print(f"copy bandwidth {copy_bw / 1e9:.1f} GB/s ({torch.cuda.get_device_name()})", flush=True)
    rows = []
    if not args.no_dense:
        rows += sweep_dense(copy_bw)
    if not args.no_mxfp4:
        rows += sweep_mxfp4([int(t) for t in args.tokens.split(",")], copy_bw)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"copy_bw": copy_bw, "rows": rows}, f)
    print(best_table(rows))


if __name__ == "__main__":
    main()

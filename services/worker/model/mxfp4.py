"""MXFP4 as the released gpt-oss checkpoints store their experts.

A row of `n` values (n a multiple of 32) is cut into groups of 32. Each group has
one e8m0 scale byte (the power of two `2 ** (byte - 127)`) and 16 bytes holding its
32 e2m1 codes, two per byte with the EVEN element in the LOW nibble. This is the
layout openai/gpt-oss's weight loader and transformers' `convert_moe_packed_tensors`
decode (`lut[blk & 0xF]` to even positions, `lut[blk >> 4]` to odd ones, then
`ldexp(values, scale - 127)`).

    blocks: [..., rows, n // 32, 16] uint8
    scales: [..., rows, n // 32]     uint8
    values: [..., rows, n]           float
"""

from __future__ import annotations

import torch

VALUES_PER_SCALE = 32
BYTES_PER_BLOCK = VALUES_PER_SCALE // 2
SCALE_BIAS = 127

# e2m1 code -> value: bit 3 is the sign, bits 0-2 index the magnitudes.
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
FP4_MAX = 6.0
# Midpoints between consecutive magnitudes; rounding picks the code by bucketing.
_MAGNITUDE_EDGES = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)


def dequantize(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Unpack MXFP4 to floats.

    blocks [..., G, 16] uint8, scales [..., G] uint8 -> [..., G * 32] dtype.
    """
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise ValueError(f"MXFP4 blocks and scales must be uint8, got {blocks.dtype} and {scales.dtype}")
    if blocks.shape[-1] != BYTES_PER_BLOCK or blocks.shape[:-1] != scales.shape:
        raise ValueError(
            f"MXFP4 blocks {tuple(blocks.shape)} do not match scales {tuple(scales.shape)}: "
            f"expected blocks [..., G, {BYTES_PER_BLOCK}] and scales [..., G]"
        )
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32, device=blocks.device)
    low = lut[(blocks & 0x0F).long()]
    high = lut[(blocks >> 4).long()]
    # interleave: byte j holds elements 2j (low nibble) and 2j+1 (high nibble)
    values = torch.stack((low, high), dim=-1).flatten(-2)  # [..., G, 32]
    exponents = scales.to(torch.int32) - SCALE_BIAS
    values = torch.ldexp(values, exponents.unsqueeze(-1).to(torch.float32))
    return values.flatten(-2).to(dtype)


def quantize(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Round floats to MXFP4 (nearest representable value, per-32 power-of-two scale).

    values [..., n] float with n % 32 == 0 -> (blocks [..., n/32, 16] uint8, scales [..., n/32] uint8).
    The scale of a group is the smallest power of two that brings its largest
    magnitude within e2m1's range (6.0), so nothing saturates.
    """
    if values.shape[-1] % VALUES_PER_SCALE:
        raise ValueError(f"MXFP4 needs the last dimension to be a multiple of 32, got {values.shape[-1]}")
    groups = values.float().unflatten(-1, (-1, VALUES_PER_SCALE))  # [..., G, 32]
    amax = groups.abs().amax(dim=-1)
    # smallest e with amax / 2**e <= 6; all-zero groups get the smallest scale
    exponent = torch.ceil(torch.log2(amax.clamp_min(torch.finfo(torch.float32).tiny) / FP4_MAX))
    exponent = exponent.clamp(-SCALE_BIAS, SCALE_BIAS).to(torch.int32)
    scaled = torch.ldexp(groups, -exponent.unsqueeze(-1).to(torch.float32))
    edges = torch.tensor(_MAGNITUDE_EDGES, dtype=torch.float32, device=values.device)
    magnitude_code = torch.bucketize(scaled.abs().clamp_max(FP4_MAX), edges).to(torch.uint8)
    sign = (scaled < 0).to(torch.uint8) << 3
    codes = magnitude_code | sign  # [..., G, 32]
    blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)
    scales = (exponent + SCALE_BIAS).to(torch.uint8)
    return blocks.contiguous(), scales.contiguous()

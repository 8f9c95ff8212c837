"""MXFP4 packing: nibble order, scales, round trips, and agreement with transformers' decoder."""

from __future__ import annotations

import pytest
import torch

from services.worker.model.mxfp4 import FP4_VALUES, dequantize, quantize


def test_low_nibble_is_the_even_element():
    # byte 0x71: low nibble 1 (0.5) first, high nibble 7 (6.0) second; scale 128 = 2**1
    blocks = torch.zeros(1, 1, 16, dtype=torch.uint8)  # one row, one group
    blocks[0, 0, 0] = 0x71
    blocks[0, 0, 1] = 0x9A  # low 0xA = -1.0, high 0x9 = -0.5
    scales = torch.tensor([[128]], dtype=torch.uint8)
    values = dequantize(blocks, scales)
    assert values.shape == (1, 32)
    assert values[0, :4].tolist() == [1.0, 12.0, -2.0, -1.0]
    assert values[0, 4:].abs().sum() == 0


def test_exactly_representable_values_round_trip_bit_for_bit():
    g = torch.Generator().manual_seed(0)
    # codes without -0 (8), each group holding a +-6 so quantize picks the same scale back
    codes = torch.randint(0, 15, (3, 5, 4, 32), generator=g, dtype=torch.uint8)
    codes[codes == 8] = 1
    codes[..., 7] = 7
    blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)
    scales = torch.randint(100, 150, (3, 5, 4), generator=g, dtype=torch.uint8)
    values = dequantize(blocks, scales)
    again_blocks, again_scales = quantize(values)
    assert torch.equal(again_scales, scales)
    assert torch.equal(again_blocks, blocks)


def test_quantize_rounds_to_the_nearest_value_within_half_a_step():
    g = torch.Generator().manual_seed(1)
    values = torch.randn(8, 256, generator=g) * torch.logspace(-3, 2, 8)[:, None]
    blocks, scales = quantize(values)
    assert blocks.shape == (8, 8, 16) and scales.shape == (8, 8)
    assert blocks.dtype == torch.uint8 and scales.dtype == torch.uint8
    restored = dequantize(blocks, scales)
    step = torch.ldexp(torch.ones(8, 8), scales.to(torch.int32) - 127)  # value of one unit at that scale
    # e2m1's widest gap is 2 units (4 -> 6), so rounding moves a value at most 1 unit
    error = (restored - values).abs().unflatten(-1, (8, 32)).amax(-1)
    assert (error <= step).all()
    # nothing saturates: each group's largest magnitude fits under 6 units
    assert (values.abs().unflatten(-1, (8, 32)).amax(-1) <= 6 * step).all()
    # and the result is a fixed point
    assert torch.equal(dequantize(*quantize(restored)), restored)


def test_zero_groups_and_signs():
    values = torch.zeros(2, 64)
    values[1, 32:] = -torch.tensor(FP4_VALUES[:8]).repeat(4)
    restored = dequantize(*quantize(values))
    assert torch.equal(restored, values)


def test_matches_transformers_decoder():
    mxfp4 = pytest.importorskip("transformers.integrations.mxfp4")
    g = torch.Generator().manual_seed(2)
    blocks = torch.randint(0, 256, (3, 12, 2, 16), generator=g, dtype=torch.uint8)
    scales = torch.randint(110, 140, (3, 12, 2), generator=g, dtype=torch.uint8)
    theirs = mxfp4.convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)  # [E, in, out]
    ours = dequantize(blocks, scales)  # [E, out, in]
    assert torch.equal(ours, theirs.transpose(1, 2))


def test_bad_shapes_are_rejected():
    with pytest.raises(ValueError, match="multiple of 32"):
        quantize(torch.zeros(4, 33))
    with pytest.raises(ValueError, match="do not match"):
        dequantize(torch.zeros(2, 3, 16, dtype=torch.uint8), torch.zeros(2, 4, dtype=torch.uint8))
    with pytest.raises(ValueError, match="uint8"):
        dequantize(torch.zeros(2, 16), torch.zeros(2, dtype=torch.uint8))

"""The tensor-core decode GEMV's weights on the CPU: the repacked copy widens to every code exactly as the
kernel's PTX does (emulated), and which experts get copies (cuda backend, decided once at load)."""

import struct

import pytest
import torch

E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


def e2m1(code: int) -> float:
    return -E2M1[code & 7] if code & 8 else E2M1[code & 7]


def bf16(bits: int) -> float:
    return struct.unpack("<f", struct.pack("<I", (bits & 0xFFFF) << 16))[0]


@pytest.mark.parametrize("groups", [90, 33, 7, 6, 5, 4, 3, 1])
def test_repacked_words_widen_to_every_code(groups):
    """Word t of group j (quad-transposed; a last partial quad on its own) widens to the codes of K 32j + 8t + 0..7,
    pair p = (K 2p, 2p + 1) in the (low, high) halves, each the e2m1 value times 2**-126."""
    from kernels.mxfp4_mma import repack, widen_reference

    blocks = torch.randint(0, 256, (2, 3, groups, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(groups))
    blocks[0, 0, 0] = torch.arange(16, dtype=torch.uint8) * 17  # every code in both nibbles
    packed = repack(blocks)
    assert packed.shape == blocks.shape and packed.dtype == torch.uint8
    words = packed.view(torch.int32).view(2, 3, groups * 4).tolist()
    full, tail = divmod(groups, 4)
    for e in range(2):
        for r in range(3):
            for j in range(groups):
                quad, i = divmod(j, 4)
                for t in range(4):
                    at = 16 * quad + 4 * t + i if quad < full else 16 * full + tail * t + i
                    pairs = widen_reference(words[e][r][at] & 0xFFFFFFFF)
                    for k in range(8):
                        byte = int(blocks[e, r, j, 4 * t + k // 2])
                        code = byte >> 4 if k % 2 else byte & 15
                        got = bf16(pairs[k // 2] >> (16 * (k % 2))) * 2.0**126
                        assert got == e2m1(code), (e, r, j, t, k)


@pytest.fixture(scope="module")
def packed_mlps(tiny_checkpoint):
    from services.worker.model.torch_model import load_model

    model = load_model(tiny_checkpoint, device="cpu", dtype=torch.bfloat16, keep_mxfp4=True)
    return [layer.mlp for layer in model.model.layers], model.config


def test_decode_copies_policy(packed_mlps, monkeypatch):
    from services.worker.model.cuda_moe import decode_copies

    mlps, _ = packed_mlps
    nbytes = sum(m.experts.gate_up_proj_blocks.nbytes + m.experts.down_proj_blocks.nbytes for m in mlps)
    monkeypatch.delenv("ROSE_MXFP4_GEMV", raising=False)
    assert decode_copies(mlps, 4 * nbytes) and not decode_copies(mlps, 4 * nbytes - 4)
    monkeypatch.setenv("ROSE_MXFP4_GEMV", "mma")
    assert decode_copies(mlps, 0)
    monkeypatch.setenv("ROSE_MXFP4_GEMV", "fma")
    assert not decode_copies(mlps, 1 << 60)
    monkeypatch.setenv("ROSE_MXFP4_GEMV", "fast")
    with pytest.raises(ValueError, match="auto, mma or fma"):
        decode_copies(mlps, 0)


def test_triton_kernels_copies_policy(packed_mlps, monkeypatch):
    """triton-kernels' copies: never with ROSE_MOE_TRITON_KERNELS=off, an error when asked for and it does
    not import, and in auto where it imports and they take at most a quarter of the free memory."""
    from kernels import moe_triton_kernels
    from services.worker.model.cuda_moe import triton_kernels_copies

    mlps, _ = packed_mlps
    nbytes = sum(b.nbytes + s.nbytes for m in mlps for b, s in (
        (m.experts.gate_up_proj_blocks, m.experts.gate_up_proj_scales),
        (m.experts.down_proj_blocks, m.experts.down_proj_scales)))
    monkeypatch.delenv("ROSE_MOE_TRITON_KERNELS", raising=False)
    monkeypatch.setattr(moe_triton_kernels, "available", lambda: False)
    assert not triton_kernels_copies(mlps, 1 << 60)
    monkeypatch.setenv("ROSE_MOE_TRITON_KERNELS", "on")
    with pytest.raises(RuntimeError, match="does not import"):
        triton_kernels_copies(mlps, 1 << 60)
    monkeypatch.setattr(moe_triton_kernels, "available", lambda: True)
    assert triton_kernels_copies(mlps, 0)
    monkeypatch.setenv("ROSE_MOE_TRITON_KERNELS", "auto")
    assert triton_kernels_copies(mlps, 4 * nbytes) and not triton_kernels_copies(mlps, 4 * nbytes - 4)
    monkeypatch.setenv("ROSE_MOE_TRITON_KERNELS", "off")
    assert not triton_kernels_copies(mlps, 1 << 60)
    monkeypatch.setenv("ROSE_MOE_TRITON_KERNELS", "fast")
    with pytest.raises(ValueError, match="auto, on or off"):
        triton_kernels_copies(mlps, 0)


def test_copies_where_the_weights_fit(packed_mlps):
    """Copies of both projections when granted; none for scale bytes past MMA_MAX_SCALE (a weight beyond
    6 * 2**65) or out not in 16-row tiles, which the FMA kernel takes."""
    from kernels.mxfp4_mma import MMA_MAX_SCALE, mma_layout_ok, mma_scales_ok, repack
    from services.worker.model.cuda_moe import GroupedExperts

    (mlp, *_), config = packed_mlps
    experts = mlp.experts
    assert experts.gate_up_proj_blocks.shape[1] % 16 == 0  # the tiny model's 2 x 64 gate_up rows
    moe = GroupedExperts(mlp, config, decode_copies=True)
    assert torch.equal(moe.gate_up_mma, repack(experts.gate_up_proj_blocks))
    assert torch.equal(moe.down_mma, repack(experts.down_proj_blocks))
    none = GroupedExperts(mlp, config)
    assert none.gate_up_mma is None and none.down_mma is None
    scales = experts.gate_up_proj_scales
    saved = scales.clone()
    try:
        scales.view(-1)[7] = MMA_MAX_SCALE
        assert mma_scales_ok(scales) and GroupedExperts(mlp, config, decode_copies=True).gate_up_mma is not None
        scales.view(-1)[7] = MMA_MAX_SCALE + 1
        moe = GroupedExperts(mlp, config, decode_copies=True)
        assert not mma_scales_ok(scales) and moe.gate_up_mma is None and moe.down_mma is not None
    finally:
        scales.copy_(saved)
    blocks = experts.gate_up_proj_blocks
    assert not mma_layout_ok(blocks[:, :8].contiguous(), scales[:, :8].contiguous())  # out not in 16-row tiles

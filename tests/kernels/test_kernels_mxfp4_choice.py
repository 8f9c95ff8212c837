"""Which decode GEMV the cuda backend's experts pick for gate_up, decided once from the weights (CPU)."""

import pytest
import torch


@pytest.fixture(scope="module")
def packed_mlp(tiny_checkpoint):
    from services.worker.model.torch_model import load_model

    model = load_model(tiny_checkpoint, device="cpu", dtype=torch.bfloat16, keep_mxfp4=True)
    return model.model.layers[0].mlp, model.config


def test_tensor_cores_where_the_weights_fit(packed_mlp, monkeypatch):
    from services.worker.model.cuda_moe import GroupedExperts

    monkeypatch.delenv("ROSE_MXFP4_GEMV", raising=False)
    mlp, config = packed_mlp
    assert mlp.experts.gate_up_proj_blocks.shape[1] % 16 == 0  # the tiny model's 2 x 64 gate_up rows
    assert GroupedExperts(mlp, config).gate_up_mma
    monkeypatch.setenv("ROSE_MXFP4_GEMV", "fma")
    assert not GroupedExperts(mlp, config).gate_up_mma


def test_fma_kernel_for_scales_the_bf16_multiplier_cannot_hold(packed_mlp, monkeypatch):
    """A scale byte above MMA_MAX_SCALE (a weight beyond +-12) sends gate_up to the FMA kernel."""
    from kernels.mxfp4_mma import MMA_MAX_SCALE, mma_layout_ok, mma_scales_ok
    from services.worker.model.cuda_moe import GroupedExperts

    monkeypatch.delenv("ROSE_MXFP4_GEMV", raising=False)
    mlp, config = packed_mlp
    scales = mlp.experts.gate_up_proj_scales
    saved = scales.clone()
    try:
        scales.view(-1)[7] = MMA_MAX_SCALE
        assert mma_scales_ok(scales) and GroupedExperts(mlp, config).gate_up_mma
        scales.view(-1)[7] = MMA_MAX_SCALE + 1
        assert not mma_scales_ok(scales) and not GroupedExperts(mlp, config).gate_up_mma
    finally:
        scales.copy_(saved)
    blocks = mlp.experts.gate_up_proj_blocks
    assert not mma_layout_ok(blocks[:, :8].contiguous(), scales[:, :8].contiguous())  # out not in 16-row tiles

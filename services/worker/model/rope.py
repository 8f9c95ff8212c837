"""Rotary position embedding with YaRN, as gpt-oss uses it.

NTK-by-parts: frequencies that turn many times inside the original context keep
their value (extrapolation), slow ones are divided by `factor` (interpolation), with
a linear ramp between the two correction dims derived from beta_fast/beta_slow.
cos/sin carry YaRN's concentration 0.1*ln(factor)+1, so q.k scales by its square.
The rotation pairs the first half of a head with the second half (not interleaved).
"""

from __future__ import annotations

import math

import torch

from services.worker.model.config import GptOssConfig


def yarn_inv_freq(config: GptOssConfig) -> tuple[torch.Tensor, float]:
    """(inverse frequencies [head_dim/2] float32, concentration)."""
    dim = config.head_dim
    base = float(config.rope_theta)
    freq = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    scaling = config.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    factor = float(scaling.get("factor", 1.0))
    if kind != "yarn" or factor <= 1.0:
        return 1.0 / freq, 1.0
    concentration = float(scaling.get("attention_factor") or 0.1 * math.log(factor) + 1.0)
    original_context = scaling["original_max_position_embeddings"]
    beta_fast = float(scaling.get("beta_fast") or 32.0)
    beta_slow = float(scaling.get("beta_slow") or 1.0)

    def correction_dim(rotations: float) -> float:
        # the dim whose wavelength fits `rotations` turns into the original context
        return dim * math.log(original_context / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # a zero-width ramp would divide by zero
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1: extrapolate (fast dims), 0: interpolate (slow dims)
    inv_freq = (1.0 / (factor * freq)) * (1 - keep) + (1.0 / freq) * keep
    return inv_freq, concentration


class RotaryEmbedding(torch.nn.Module):
    def __init__(self, config: GptOssConfig):
        super().__init__()
        inv_freq, self.concentration = yarn_inv_freq(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T] int64 -> cos, sin [T, head_dim/2] float32 (concentration applied)."""
        angles = positions.to(torch.float32)[:, None] * self.inv_freq[None, :]
        return angles.cos() * self.concentration, angles.sin() * self.concentration


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, head_dim], cos/sin [T, head_dim/2] float32 -> rotated x in float32."""
    first, second = x.float().chunk(2, dim=-1)
    cos, sin = cos[:, None, :], sin[:, None, :]
    return torch.cat((first * cos - second * sin, second * cos + first * sin), dim=-1)

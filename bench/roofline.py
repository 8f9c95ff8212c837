"""Memory-bound decode limits of a gpt-oss checkpoint: bytes a decode step must read, over copy bandwidth.

A decode step of a batch of B sequences reads, at the least, once:
- per layer: attention weights and biases, sinks, both norms, the router, and the
  MXFP4 blocks, scales and biases of every expert the batch routes to (top-k for
  one token; for B tokens the expected number of distinct experts under uniform
  routing, E * (1 - (1 - k/E)^B));
- one embedding row per token, the final norm and the whole unembedding;
- each sequence's KV cache: context (capped by the window on sliding layers) x
  k and v x kv heads x head_dim x the KV dtype's bytes.
Dense weights count as bf16 and experts as MXFP4, as the checkpoint stores them, so
the bound is what a backend reading the checkpoint's format could reach; a backend
that dequantizes experts reads more. The bandwidth is a large copy's (bytes read +
written) / time, measured in the same run: torch's copy_ on CPU, the device-to-device
copy of bench.kernels on CUDA.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch

from services.worker.model.config import GptOssConfig
from services.worker.model.mxfp4 import BYTES_PER_BLOCK, VALUES_PER_SCALE

BF16 = 2


@dataclass
class DecodeBound:
    """The memory-bound limit of one decode step of `batch` sequences at context `context`."""

    batch: int
    context: int
    weight_bytes: int  # read once per step
    kv_bytes: int  # over the whole batch
    bandwidth: float  # bytes/s
    step_s: float  # (weight_bytes + kv_bytes) / bandwidth: the least TPOT
    tokens_per_s: float  # batch / step_s: the most output tokens/s

    def as_dict(self) -> dict:
        return asdict(self)


def expert_bytes(config: GptOssConfig) -> int:
    """Bytes of one expert in MXFP4: gate_up and down blocks, scales and bf16 biases."""
    h, i = config.hidden_size, config.intermediate_size
    gate_up = 2 * i * (h // VALUES_PER_SCALE) * (BYTES_PER_BLOCK + 1) + 2 * i * BF16
    down = h * (i // VALUES_PER_SCALE) * (BYTES_PER_BLOCK + 1) + h * BF16
    return gate_up + down


def distinct_experts(experts: int, top_k: int, batch: int) -> float:
    """Expected experts hit by `batch` tokens each routed to top_k of `experts`, uniformly."""
    return experts * (1.0 - (1.0 - top_k / experts) ** batch)


def step_weight_bytes(config: GptOssConfig, batch: int = 1) -> int:
    """Weight bytes one decode step of `batch` tokens must read (see the module docstring)."""
    c = config
    h = c.hidden_size
    attention = (2 * c.q_size * h + 2 * c.kv_size * h) * BF16  # q, o, k, v weights
    attention += (c.q_size + 2 * c.kv_size + h + c.num_attention_heads) * BF16  # biases, sinks
    norms = 2 * h * BF16
    total = 0.0
    for layer in range(c.num_hidden_layers):
        experts = c.experts_in(layer)
        router = (experts * h + experts) * BF16
        hit = distinct_experts(experts, c.num_experts_per_tok, batch)
        total += attention + norms + router + hit * expert_bytes(c)
    total += batch * h * BF16  # embedding rows
    total += h * BF16 + c.vocab_size * h * BF16  # final norm, unembedding
    return int(total)


def kv_bytes_per_token(config: GptOssConfig, context: int, kv_itemsize: int) -> int:
    """KV bytes one sequence's decode step reads at this context length, all layers."""
    per_position = 2 * config.num_key_value_heads * config.head_dim * kv_itemsize
    seen = 0
    for layer in range(config.num_hidden_layers):
        window = config.window_of(layer)
        seen += min(context, window) if window else context
    return seen * per_position


def decode_bound(config: GptOssConfig, bandwidth: float, batch: int, context: int, kv_itemsize: int) -> DecodeBound:
    weights = step_weight_bytes(config, batch)
    kv = batch * kv_bytes_per_token(config, context, kv_itemsize)
    step = (weights + kv) / bandwidth
    return DecodeBound(batch, context, weights, kv, bandwidth, step, batch / step)


def copy_bandwidth(device: str) -> float:
    """Bytes/s (read + written) of a large copy on this device, measured now."""
    if device.startswith("cuda"):
        from bench.kernels import copy_bandwidth as cuda_copy_bandwidth

        return max(cuda_copy_bandwidth())
    src = torch.randn(64 << 20)  # 256 MiB: far past any CPU cache
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - start)
    return 2 * src.numel() * src.element_size() / best

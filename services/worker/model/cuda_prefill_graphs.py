"""Piecewise CUDA graphs of the cuda backend's prefill steps: everything but attention, per token bucket.

A step that carries a long prompt chunk (past what cuda_graphs.as_decode_rows replays) launches
some 15 kernels a layer and, with triton-kernels' MoE GEMM (kernels/moe_triton_kernels.py), a few
hundred microseconds of Python each call: eager, a 2048-token step kept the host busier than the
GPU. Here the work between two layers' attentions is captured once per bucket of tokens, as vLLM
captures its prefills piecewise, and a step replays it:

    segment 0      embedding, the first norm, layer 0's QKV projection
    attention i    eager: rotary, the cache write and FlashInfer's prefill attention of layer i
                   on the step's T real rows (their plan changes every step)
    segment i+1    layer i's o_proj, norm, router, experts, combine + the next norm, then layer
                   i+1's QKV projection (after the last layer: the final norm's output)

T tokens run in the smallest bucket B >= T: rows T..B are padding, finite values left by earlier
steps that no real row reads (each row's MoE and norms are its own), so they cost only compute.
Segments read and write fixed buffers sized for the largest bucket, shared by every bucket (steps
run one at a time), and all graphs share one memory pool, captured largest first.
"""

from __future__ import annotations

import os

import torch

from kernels.embedding import embedding
from kernels.gemv import linear
from kernels.rmsnorm import rmsnorm


def prefill_graphs_enabled() -> bool:
    """ROSE_PREFILL_GRAPHS=0 runs long prompt chunks eagerly (A/B timing)."""
    return os.environ.get("ROSE_PREFILL_GRAPHS", "1") != "0"


# Steps past this many tokens run eagerly: every bucket is a graph a layer (25 for gpt-oss-20b) captured
# at start-up, and this cap is already 20 buckets; the longer a step, the smaller its host's share
MAX_GRAPH_TOKENS = 4096


def prefill_buckets(max_tokens: int) -> tuple[int, ...]:
    """Token buckets up to min(max_tokens, MAX_GRAPH_TOKENS): every 128 to 1024, then every 256 (a step pads at
    most 127 rows, then 255: 12% of a 2048-token bucket)."""
    buckets, b = [], 128
    while True:
        buckets.append(b)
        if b >= min(max_tokens, MAX_GRAPH_TOKENS):
            return tuple(buckets)
        b += 128 if b < 1024 else 256


class PrefillGraphs:
    """The segment graphs of one model, bucket by bucket (they bind no KV cache: attention stays eager)."""

    def __init__(self, model, max_tokens: int):
        c = model.config
        self.model = model
        self.buckets = prefill_buckets(max_tokens)
        top, dev, dtype = self.buckets[-1], model.device, model.dtype
        self.pool = torch.cuda.graph_pool_handle()
        # zeros, so padding rows start finite; every bucket's graphs read views of these
        self.tokens = torch.zeros(top, dtype=torch.long, device=dev)
        self.resid = torch.zeros(top, c.hidden_size, dtype=dtype, device=dev)
        self.qkv = torch.zeros(top, c.q_size + 2 * c.kv_size, dtype=dtype, device=dev)
        self.attn = torch.zeros(top, c.q_size, dtype=dtype, device=dev)
        self.final = torch.zeros(top, c.hidden_size, dtype=dtype, device=dev)
        self.captured: dict[int, list[torch.cuda.CUDAGraph]] = {}

    def fits(self, tokens: int) -> bool:
        return tokens <= self.buckets[-1]

    def bucket(self, tokens: int) -> int:
        return next(b for b in self.buckets if b >= tokens)

    def capture_all(self) -> None:
        """Every bucket, largest first (the pool is sized once): at start-up, so no step waits for a capture."""
        for b in reversed(self.buckets):
            if b not in self.captured:
                self._capture(b)

    def layers(self, tokens: torch.Tensor, cos, sin, attention, kv) -> torch.Tensor:
        """The final norm's output [T, hidden] bf16 for a step's T tokens, attention planned on `attention`."""
        t = tokens.shape[0]
        b = self.bucket(t)
        graphs = self.captured.get(b) or self._capture(b)
        self.tokens[:t].copy_(tokens, non_blocking=True)
        graphs[0].replay()
        for i, L in enumerate(self.model.layers):
            out = attention.attend_qkv(L["group"], L["window"], self.qkv[:t], cos, sin, kv.k[i], kv.v[i], L["sinks"])
            self.attn[:t].copy_(out.reshape(t, -1))
            graphs[i + 1].replay()
        return self.final[:t]

    def _segment(self, i: int, b: int) -> None:
        """Segment i (module docstring) on the first b rows of the buffers."""
        m, layers = self.model, self.model.layers
        if i == 0:
            resid = embedding(m.embed, self.tokens[:b])
            y, _ = rmsnorm(resid, layers[0]["norm1"], m.eps)
        else:
            L = layers[i - 1]
            attn = linear(self.attn[:b], L["o_w"], L["o_b"])
            y, resid = m._mlp(i - 1, attn, self.resid[:b])
        self.resid[:b].copy_(resid)
        if i < len(layers):
            self.qkv[:b].copy_(linear(y, layers[i]["qkv_w"], layers[i]["qkv_b"]))
        else:
            self.final[:b].copy_(y)

    def _capture(self, b: int) -> list[torch.cuda.CUDAGraph]:
        from services.worker.model.cuda_moe import captured_step

        dev = self.model.device
        graphs = []
        for i in range(len(self.model.layers) + 1):
            # one eager run first on a side stream: compiles kernels and makes lazy handles outside the capture
            side = torch.cuda.Stream(dev)
            side.wait_stream(torch.cuda.current_stream(dev))
            with torch.cuda.stream(side), captured_step():
                self._segment(i, b)
            torch.cuda.current_stream(dev).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool), captured_step():
                self._segment(i, b)
            graphs.append(graph)
        self.captured[b] = graphs
        return graphs

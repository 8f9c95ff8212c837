"""The `cuda` backend: the gpt-oss forward pass on CuTeDSL kernels, cuBLAS and FlashInfer.

    model = load_cuda_model(path)           # bf16 on the current CUDA device
    logits = model(batch, kv)               # same contract as the torch backend

It reuses the torch backend's loader and weights (`load_model(..., backend="torch")`)
and replaces the per-op code: embedding gather, RMSNorm fused with the residual add,
QKV as one projection (o_proj and the router likewise: kernels/gemv.py's GEMV for decode's
few rows, cuBLAS otherwise), rotary + KV-cache write in one Triton kernel (kernels/rope_cache.py),
FlashInfer paged attention with sinks and sliding windows,
router top-k, MoE dispatch, MXFP4 grouped expert GEMMs, SwiGLU and combine (cuda_moe.py),
and replays decode steps as CUDA graphs (cuda_graphs.py). Attention for head dims
FlashInfer does not build (it does 64, 128, 256; the tiny test checkpoint has 16) runs
the torch rotary and paged attention, eagerly.
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F
from torch import nn

from kernels.gemv import linear
from services.worker.model.batch import GROUPS, ForwardBatch, PagedKVCache, check_forward_inputs, to_device
from services.worker.model.paged_attention import AttentionPlan, paged_attention
from services.worker.model.rope import apply_rotary

FLASHINFER_HEAD_DIMS = (64, 128, 256)


def missing_cuda_requirements() -> list[str]:
    """What the cuda backend needs and this host lacks (empty when it can run)."""
    from kernels._cute import missing_gpu_packages
    from kernels.attention import missing_attention_packages

    missing = missing_gpu_packages() + missing_attention_packages()
    if importlib.util.find_spec("triton") is None:  # the MXFP4 expert GEMM (kernels/moe_mxfp4.py)
        missing.append("triton")
    if not torch.cuda.is_available():
        missing.append("a CUDA GPU (torch.cuda.is_available() is False)")
    return missing


def require_cuda_backend() -> None:
    """RuntimeError naming every missing piece, before any weight is loaded."""
    missing = missing_cuda_requirements()
    if missing:
        raise RuntimeError(
            "backend 'cuda' needs " + "; ".join(missing) + ". Install the GPU extra (pip install -e .[gpu], "
            "see docs/GPU.md) on a CUDA host, or use --backend torch."
        )


class CudaGptOss(nn.Module):
    """Wraps a loaded bf16 torch GptOssForCausalLM; the engine calls it like the torch model.

    Decode steps (one new token per sequence), with short prompt chunks too, replay CUDA graphs
    (cuda_graphs.py) unless cuda_graphs=False; longer prefills replay the prefill graphs around eager
    attention (cuda_prefill_graphs.py) up to the token budget, eagerly past it.
    """

    def __init__(self, model, block_size: int = 16, cuda_graphs: bool = True):
        super().__init__()
        from kernels.attention import SinkAttention, prefill_families
        from kernels.decode_attention import DecodeAttention, uses_decode_attention
        from kernels.norm_route import NormRoute, norm_route_enabled
        from kernels.qkv_rope import qkv_rope_enabled
        from services.worker.model.cuda_moe import GroupedExperts, decode_copies, triton_kernels_copies

        c = model.config
        if model.dtype != torch.bfloat16 or model.device.type != "cuda":
            raise ValueError("the cuda backend runs a bfloat16 model on a CUDA device")
        self.config, self.dtype = c, model.dtype
        self._device = model.device
        self.rotary = model.rotary
        self.embed = model.model.embed_tokens.weight
        self.lm_head = model.lm_head.weight
        self.final_norm = model.model.norm.weight
        self.eps = c.rms_norm_eps
        self.layers = []
        mlps, free = [layer.mlp for layer in model.model.layers], torch.cuda.mem_get_info(self._device)[0]
        copies, tk_copies = decode_copies(mlps, free), triton_kernels_copies(mlps, free)
        # decode's few tokens: the post-attention norm, router and routing in one kernel (kernels/norm_route.py)
        self.fused_route = norm_route_enabled()
        # decode's QKV GEMV also rotates q and k and writes the cache (kernels/qkv_rope.py; ROSE_FUSED_QKV_ROPE=0: apart)
        self.fused_qkv_rope = qkv_rope_enabled()
        for i, layer in enumerate(model.model.layers):
            a = layer.self_attn
            self.layers.append(dict(
                norm1=layer.input_layernorm.weight,
                norm2=layer.post_attention_layernorm.weight,
                qkv_w=torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]),
                qkv_b=torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias]),
                o_w=a.o_proj.weight, o_b=a.o_proj.bias, sinks=a.sinks.float(),
                group=c.layer_groups[i], window=a.window,
                moe=GroupedExperts(layer.mlp, c, decode_copies=copies, triton_kernels_copies=tk_copies),
                norm_route=NormRoute(layer.post_attention_layernorm.weight, layer.mlp.router.weight,
                                     layer.mlp.router.bias, c.num_experts_per_tok, c.rms_norm_eps),
            ))
        self.attention_keys = sorted({(L["group"], L["window"]) for L in self.layers}, key=str)
        self.flash = c.head_dim in FLASHINFER_HEAD_DIMS
        shape = (c.num_attention_heads, c.num_key_value_heads, c.head_dim, block_size, self.dtype, self._device)
        # steps with decode rows, and steps of prompt chunks only: fa2 and, on Hopper, fa3 (faster deep in a
        # prompt) under ROSE_PREFILL_ATTENTION=auto
        mixed, chunks = prefill_families(torch.cuda.get_device_capability(self._device))
        self.attention = SinkAttention(*shape, backend=mixed) if self.flash else None
        self.chunk_attention = (SinkAttention(*shape, backend=chunks) if self.flash and chunks != mixed
                                else self.attention)
        # decode steps' attention: the split kernel or XQA (kernels/decode_attention.py), unless
        # ROSE_DECODE_ATTENTION=flashinfer sends them to the prefill's wrapper
        self.decode_attention = (
            DecodeAttention(c.num_attention_heads, c.num_key_value_heads, c.head_dim, block_size, self.dtype,
                            self._device)
            if self.flash and uses_decode_attention() else None
        )
        self.cuda_graphs = cuda_graphs and self.flash  # the torch attention fallback is not capturable
        self.graphs = None  # DecodeGraphs over the KV cache of the last decode step
        self.prefill_graphs = None  # PrefillGraphs: long prompt chunks' steps, piecewise

    @property
    def device(self) -> torch.device:
        return self._device

    def make_kv_cache(self, num_blocks: dict[str, int], block_size: int, dtype: torch.dtype | None = None):
        """The paged cache plus one scratch block per pool (never handed out) for CUDA-graph padding rows."""
        c = self.config
        kv = PagedKVCache.allocate(c.layer_groups, {g: n + 1 for g, n in num_blocks.items()}, block_size,
                                   c.num_key_value_heads, c.head_dim, dtype or self.dtype, self._device)
        kv.scratch_blocks = dict(num_blocks)
        return kv

    @torch.inference_mode()
    def warm_up(self, kv: PagedKVCache, max_num_seqs: int, max_num_batched_tokens: int) -> None:
        """Before the first request (the engine's start-up): compile what steps will run, capture the decode graphs
        and the prefill graphs up to max_num_batched_tokens.

        The MXFP4 expert GEMM compiles once per kernel and tile config (CuTeDSL's decode GEMV,
        Triton's tiles), which follow the routed rows (tokens x top-k): one scratch prefill per
        config a step can reach, so no request waits seconds for a compile (the disk cache helps
        only the next process).
        """
        from kernels.moe_mxfp4 import GEMV_ROWS, TILE_CONFIGS
        from services.worker.model.cuda_graphs import EXTEND_TOKENS, DecodeGraphs
        from services.worker.model.cuda_prefill_graphs import PrefillGraphs, prefill_graphs_enabled

        if kv.scratch_blocks is None:
            return
        top_k = self.config.num_experts_per_tok
        bounds = [GEMV_ROWS] + [bound for bound, _ in TILE_CONFIGS[:-1]]
        tokens = {min(max(1, bound // top_k), max_num_batched_tokens) for bound in bounds}
        for t in sorted(tokens | {max_num_batched_tokens}):
            # the eager configs (a short one would replay a graph, a long one the prefill graphs)
            self._eager(_scratch_prefill(t, kv), kv, piecewise=False)
        if self.chunk_attention is not self.attention and max_num_batched_tokens > 1:
            # prompt chunks alone took chunk_attention above; a step with decode rows builds the other's kernels
            self._eager(_scratch_prefill(max_num_batched_tokens, kv, decode_rows=1), kv, piecewise=False)
        if self.cuda_graphs:
            if self.graphs is None or self.graphs.kv is not kv:
                self.graphs = DecodeGraphs(self, kv)
            # a step's decode rows and its short prompt chunks' rows (as_decode_rows) share a graph
            self.graphs.capture_up_to(max_num_seqs + (EXTEND_TOKENS if self.graphs.prompt_rows else 0))
            if self.attention is not None and prefill_graphs_enabled():
                self.prefill_graphs = PrefillGraphs(self, max_num_batched_tokens)
                self.prefill_graphs.capture_all()

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, kv: PagedKVCache, all_logits: bool = False) -> torch.Tensor:
        """Logits [num_seqs, vocab] float32 (last new token of each sequence), or [T, vocab] with all_logits.

        A decode step's logits may be a view of a graph's output buffer: read them before the next step.
        """
        from services.worker.model.cuda_graphs import DecodeGraphs, as_decode_rows

        c = self.config
        check_forward_inputs(batch, kv, c.layer_groups, c.vocab_size)
        if self.cuda_graphs and not all_logits and kv.scratch_blocks is not None:
            if self.graphs is None or self.graphs.kv is not kv:
                self.graphs = DecodeGraphs(self, kv)
            rows = as_decode_rows(batch, self.graphs.extend_rows)
            if rows is not None and self.graphs.fits(rows):
                logits = self.graphs(rows)
                if rows is batch:
                    return logits
                return logits[to_device(torch.cumsum(torch.tensor(batch.query_lens), 0) - 1, self._device)]
        return self._eager(batch, kv, all_logits)

    def _eager(self, batch: ForwardBatch, kv: PagedKVCache, all_logits: bool = False,
               piecewise: bool = True) -> torch.Tensor:
        """forward's logits from kernels launched one by one, but for the prefill graphs where they take the step
        (piecewise=False: never)."""
        from services.worker.model.cuda_graphs import is_decode

        dev = self._device
        if self.flash:
            if self.decode_attention is not None and is_decode(batch):
                attention = self.decode_attention
            else:
                attention = self.chunk_attention if min(batch.query_lens, default=1) > 1 else self.attention
            attention.block_size = kv.block_size
            attention.plan(batch, self.attention_keys, kv.scratch_blocks)
            plans = None
        else:
            attention = None
            plans = {key: AttentionPlan.build(batch, key[0], key[1], kv.block_size, dev) for key in self.attention_keys}
        # a prompt chunk's step through FlashInfer's prefill wrapper: piecewise graphs where cuda_graphs is on
        piecewise = (piecewise and attention is not None and attention is not self.decode_attention
                     and self._piecewise(len(batch.token_ids)))
        y = self._layers(to_device(batch.token_ids, dev), to_device(batch.positions, dev), attention, plans, kv,
                         piecewise)
        if not all_logits:
            last = to_device(torch.cumsum(torch.tensor(batch.query_lens), 0) - 1, dev)
            y = y[last]
        return F.linear(y, self.lm_head).float()

    def decode_logits(self, tokens: torch.Tensor, positions: torch.Tensor, attention, kv: PagedKVCache) -> torch.Tensor:
        """One token per sequence, planned on `attention`: logits [T, vocab] float32 (what a graph captures)."""
        return F.linear(self._layers(tokens, positions, attention, None, kv), self.lm_head).float()

    def _layers(self, tokens, positions, attention, plans, kv: PagedKVCache, piecewise: bool = False) -> torch.Tensor:
        """Embedding through the final norm: [T, hidden] bf16, the lm_head's input.

        piecewise: replay the prefill graphs around the attentions (cuda_prefill_graphs.py).
        """
        from kernels.embedding import embedding
        from kernels.rmsnorm import rmsnorm

        cos, sin = self.rotary.cos_sin(positions)
        if piecewise:
            return self.prefill_graphs.layers(tokens, cos, sin, attention, kv)
        resid = embedding(self.embed, tokens)
        y, _ = rmsnorm(resid, self.layers[0]["norm1"], self.eps)
        for i, L in enumerate(self.layers):
            attn = self._attention(L, y, cos, sin, kv.k[i], kv.v[i], attention, plans)
            y, resid = self._mlp(i, attn, resid)
        return y

    def _mlp(self, i: int, attn: torch.Tensor, resid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer i after its o_proj: the norm, router and experts, their combine with the residual add and the
        next norm (the final one after the last layer) in one kernel -> (next layer's input, residual)."""
        from kernels.rmsnorm import combine_rmsnorm, rmsnorm

        L = self.layers[i]
        if self.fused_route and attn.is_cuda and L["norm_route"].fits(attn.shape[0]):
            y, resid, routing, weights = L["norm_route"](attn, resid)
            ys = L["moe"].routed_rows(y, routing)
        else:
            y, resid = rmsnorm(attn, L["norm2"], self.eps, residual=resid)
            ys, routing, weights = L["moe"].expert_rows(y)
        norm = self.layers[i + 1]["norm1"] if i + 1 < len(self.layers) else self.final_norm
        return combine_rmsnorm(ys, routing.pos.view(weights.shape), weights, resid, norm, self.eps)

    def _piecewise(self, tokens: int) -> bool:
        """Whether an eager step of this many tokens replays the prefill graphs (cuda_prefill_graphs.py)."""
        from services.worker.model.cuda_prefill_graphs import PrefillGraphs, prefill_graphs_enabled

        if not (self.cuda_graphs and self.attention is not None and prefill_graphs_enabled()):
            return False
        if self.prefill_graphs is None:  # warm_up makes them for the engine's token budget; else the default one
            from shared.config import Settings

            self.prefill_graphs = PrefillGraphs(self, Settings.max_num_batched_tokens)
        return self.prefill_graphs.fits(tokens)

    def _attention(self, L: dict, x, cos, sin, k_cache, v_cache, attention, plans) -> torch.Tensor:
        from kernels.qkv_rope import qkv_rope_fits

        c = self.config
        t = x.shape[0]
        if attention is not None and self.fused_qkv_rope and qkv_rope_fits(t, L["qkv_w"], c.head_dim):
            # the projection, rotary and cache write in one GEMV
            out = attention.attend_x(L["group"], L["window"], x, L["qkv_w"], L["qkv_b"], cos, sin, k_cache, v_cache,
                                     L["sinks"])
        elif attention is not None:  # FlashInfer or the split kernel, after rotary and the cache write in one kernel
            qkv = linear(x, L["qkv_w"], L["qkv_b"])
            out = attention.attend_qkv(L["group"], L["window"], qkv, cos, sin, k_cache, v_cache, L["sinks"])
        else:
            q, k, v = linear(x, L["qkv_w"], L["qkv_b"]).split([c.q_size, c.kv_size, c.kv_size], dim=-1)
            q = apply_rotary(q.view(t, c.num_attention_heads, c.head_dim), cos, sin)
            k = apply_rotary(k.view(t, c.num_key_value_heads, c.head_dim), cos, sin)
            v = v.reshape(t, c.num_key_value_heads, c.head_dim)
            plan = plans[(L["group"], L["window"])]
            out = paged_attention(q, k, v, k_cache, v_cache, plan, L["sinks"], c.head_dim**-0.5)
        return linear(out.reshape(t, c.q_size).to(x.dtype).contiguous(), L["o_w"], L["o_b"])


def _scratch_prefill(tokens: int, kv: PagedKVCache, decode_rows: int = 0) -> ForwardBatch:
    """A step of `tokens` tokens whose every page is the pool's scratch block (it reads and writes nothing else):
    one prompt chunk, after `decode_rows` one-token sequences."""
    chunk = tokens - decode_rows
    lens = [1] * decode_rows + [chunk]
    positions = torch.cat([torch.zeros(decode_rows, dtype=torch.long), torch.arange(chunk)])
    return ForwardBatch(
        token_ids=torch.zeros(tokens, dtype=torch.long), positions=positions, query_lens=lens, context_lens=list(lens),
        block_tables={g: [[kv.scratch_blocks[g]] * -(-n // kv.block_size) if g in kv.scratch_blocks else []
                          for n in lens] for g in GROUPS})


def load_cuda_model(path: str, device: torch.device | str = "cuda", block_size: int = 16,
                    cuda_graphs: bool = True) -> CudaGptOss:
    """The cuda backend for the checkpoint at path (bf16, experts kept MXFP4; raises first if a GPU package is missing)."""
    from services.worker.model.torch_model import load_model

    require_cuda_backend()
    model = load_model(path, backend="torch", device=device, dtype=torch.bfloat16, keep_mxfp4=True)
    return CudaGptOss(model, block_size, cuda_graphs)

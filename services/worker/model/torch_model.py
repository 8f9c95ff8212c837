"""The gpt-oss forward pass in plain PyTorch (CPU or GPU, float32 or bfloat16).

    model = load_model(path, device="cpu", dtype=torch.float32)
    kv = model.make_kv_cache({"full": 64, "sliding": 64}, block_size=16)
    logits = model(batch, kv)                  # [num_seqs, vocab] float32, last new token of each
    logits = model(batch, kv, all_logits=True) # [T, vocab] float32, every new token

Module and parameter names mirror the checkpoint's (model.layers.N.self_attn.q_proj...),
so loading is a name-for-name copy. Per layer: RMSNorm, QKV with bias, YaRN rotary,
GQA attention with per-head sinks (and a sliding window on window layers) over the
paged cache, o_proj with bias, residual; RMSNorm, top-k router, MXFP4-dequantized
experts with clamped SwiGLU, weighted sum, residual. Norms, sinks, rotary, attention
softmax and the router's softmax run in float32 whatever the weights' dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from services.worker.model.batch import ForwardBatch, PagedKVCache, check_forward_inputs
from services.worker.model.checkpoint import Checkpoint
from services.worker.model.config import GptOssConfig
from services.worker.model.errors import CheckpointError
from services.worker.model.mxfp4 import dequantize
from services.worker.model.paged_attention import AttentionPlan, paged_attention
from services.worker.model.rope import RotaryEmbedding, apply_rotary

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def _weight(*shape: int, dtype: torch.dtype) -> nn.Parameter:
    """A frozen placeholder on the meta device (no memory, no init); load_model swaps in the real tensor."""
    return nn.Parameter(torch.empty(shape, dtype=dtype, device="meta"), requires_grad=False)


class Linear(nn.Module):
    """y = x W^T + b with W [out, in] as stored in the checkpoint."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype):
        super().__init__()
        self.weight = _weight(out_features, in_features, dtype=dtype)
        self.bias = _weight(out_features, dtype=dtype) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class Embedding(nn.Module):
    def __init__(self, vocab: int, hidden: int, dtype: torch.dtype):
        super().__init__()
        self.weight = _weight(vocab, hidden, dtype=dtype)

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        """token_ids [T] int64 -> [T, hidden]."""
        return F.embedding(token_ids, self.weight)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = _weight(size, dtype=torch.float32)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, hidden] -> [T, hidden] in x's dtype (computed in float32)."""
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight * normed).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, config: GptOssConfig, layer: int, dtype: torch.dtype):
        super().__init__()
        h, q, kv = config.hidden_size, config.q_size, config.kv_size
        self.q_proj = Linear(h, q, True, dtype)
        self.k_proj = Linear(h, kv, True, dtype)
        self.v_proj = Linear(h, kv, True, dtype)
        self.o_proj = Linear(q, h, True, dtype)
        self.sinks = _weight(config.num_attention_heads, dtype=torch.float32)
        self.num_heads, self.kv_heads, self.head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.scale = config.head_dim**-0.5
        self.window = config.window_of(layer)

    def forward(self, x, cos, sin, plan: AttentionPlan, k_cache, v_cache) -> torch.Tensor:
        """x [T, hidden] -> [T, hidden]; writes this step's k/v into k_cache/v_cache."""
        t = x.shape[0]
        q = apply_rotary(self.q_proj(x).view(t, self.num_heads, self.head_dim), cos, sin)
        k = apply_rotary(self.k_proj(x).view(t, self.kv_heads, self.head_dim), cos, sin)
        v = self.v_proj(x).view(t, self.kv_heads, self.head_dim)
        out = paged_attention(q, k, v, k_cache, v_cache, plan, self.sinks, self.scale)
        return self.o_proj(out.to(x.dtype))


class Router(nn.Module):
    def __init__(self, config: GptOssConfig, experts: int, dtype: torch.dtype):
        super().__init__()
        self.weight = _weight(experts, config.hidden_size, dtype=dtype)
        self.bias = _weight(experts, dtype=dtype)
        self.top_k = config.num_experts_per_tok

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, hidden] -> (weights [T, k] float32 summing to 1, expert ids [T, k] int64)."""
        logits = F.linear(x, self.weight, self.bias)
        top_logits, top_ids = torch.topk(logits, self.top_k, dim=-1)
        return torch.softmax(top_logits.float(), dim=-1), top_ids


class Experts(nn.Module):
    """Stacked expert weights, rows = outputs as in the checkpoint.

    gate_up_proj [E, 2*inter, hidden] (row 2j gate j, row 2j+1 up j), gate_up_proj_bias [E, 2*inter],
    down_proj [E, hidden, inter], down_proj_bias [E, hidden].
    With packed=True the matrices stay MXFP4 as stored (`*_blocks` [E, rows, cols/32, 16] uint8,
    `*_scales` [E, rows, cols/32] uint8) and each expert is dequantized when a token picks it:
    a quarter of the memory (gpt-oss-120b fits one GPU) for some speed.
    """

    def __init__(self, config: GptOssConfig, experts: int, dtype: torch.dtype, packed: bool = False):
        super().__init__()
        h, i = config.hidden_size, config.intermediate_size
        self.packed, self.dtype = packed, dtype
        if packed:
            self.gate_up_proj_blocks = _weight(experts, 2 * i, h // 32, 16, dtype=torch.uint8)
            self.gate_up_proj_scales = _weight(experts, 2 * i, h // 32, dtype=torch.uint8)
            self.down_proj_blocks = _weight(experts, h, i // 32, 16, dtype=torch.uint8)
            self.down_proj_scales = _weight(experts, h, i // 32, dtype=torch.uint8)
        else:
            self.gate_up_proj = _weight(experts, 2 * i, h, dtype=dtype)
            self.down_proj = _weight(experts, h, i, dtype=dtype)
        self.gate_up_proj_bias = _weight(experts, 2 * i, dtype=dtype)
        self.down_proj_bias = _weight(experts, h, dtype=dtype)
        self.alpha, self.limit = config.swiglu_alpha, config.swiglu_limit

    def matrices(self, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate_up [2*inter, hidden], down [hidden, inter]) of one expert in the model dtype."""
        if not self.packed:
            return self.gate_up_proj[expert], self.down_proj[expert]
        return (dequantize(self.gate_up_proj_blocks[expert], self.gate_up_proj_scales[expert], self.dtype),
                dequantize(self.down_proj_blocks[expert], self.down_proj_scales[expert], self.dtype))

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """x [T, hidden], weights [T, k] float32, ids [T, k] -> [T, hidden] in x's dtype."""
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        for expert in torch.unique(ids).tolist():
            token, slot = torch.nonzero(ids == expert, as_tuple=True)
            gate_up_w, down_w = self.matrices(expert)
            gate_up = F.linear(x[token], gate_up_w, self.gate_up_proj_bias[expert])
            gate = gate_up[:, 0::2].clamp(max=self.limit)
            up = gate_up[:, 1::2].clamp(min=-self.limit, max=self.limit)
            hidden = (up + 1) * (gate * torch.sigmoid(self.alpha * gate))
            y = F.linear(hidden, down_w, self.down_proj_bias[expert])
            out.index_add_(0, token, y.float() * weights[token, slot, None])
        return out.to(x.dtype)


class MLP(nn.Module):
    def __init__(self, config: GptOssConfig, layer: int, dtype: torch.dtype, packed: bool):
        super().__init__()
        experts = config.experts_in(layer)
        self.router = Router(config, experts, dtype)
        self.experts = Experts(config, experts, dtype, packed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = self.router(x)
        return self.experts(x, weights, ids)


class DecoderLayer(nn.Module):
    def __init__(self, config: GptOssConfig, layer: int, dtype: torch.dtype, packed: bool):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer, dtype)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config, layer, dtype, packed)

    def forward(self, x, cos, sin, plan, k_cache, v_cache) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, plan, k_cache, v_cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class GptOssBody(nn.Module):
    """`model.*` of the checkpoint: embedding, layers, final norm."""

    def __init__(self, config: GptOssConfig, dtype: torch.dtype, packed: bool):
        super().__init__()
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size, dtype)
        self.layers = nn.ModuleList(DecoderLayer(config, i, dtype, packed) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class GptOssForCausalLM(nn.Module):
    """The whole model; call it with a ForwardBatch and the PagedKVCache it writes.

    Built with empty (meta) parameters; `load_model` fills them from a checkpoint.
    """

    def __init__(self, config: GptOssConfig, dtype: torch.dtype = torch.float32, keep_mxfp4: bool = False):
        super().__init__()
        self.config = config
        self.dtype = dtype
        self.keep_mxfp4 = keep_mxfp4
        self.model = GptOssBody(config, dtype, keep_mxfp4)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, False, dtype)
        self.rotary = RotaryEmbedding(config)
        self.requires_grad_(False)

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    def make_kv_cache(
        self, num_blocks: dict[str, int], block_size: int, dtype: torch.dtype | None = None
    ) -> PagedKVCache:
        """A zeroed paged cache for this model on its device (dtype defaults to the model's)."""
        c = self.config
        return PagedKVCache.allocate(c.layer_groups, num_blocks, block_size, c.num_key_value_heads, c.head_dim,
                                     dtype or self.dtype, self.device)

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, kv: PagedKVCache, all_logits: bool = False) -> torch.Tensor:
        """Logits [num_seqs, vocab] float32 (last new token of each sequence), or [T, vocab] with all_logits."""
        c = self.config
        check_forward_inputs(batch, kv, c.layer_groups, c.vocab_size)
        device = self.device
        token_ids = batch.token_ids.to(device)
        cos, sin = self.rotary.cos_sin(batch.positions.to(device))
        plans: dict[tuple[str, int | None], AttentionPlan] = {}
        x = self.model.embed_tokens(token_ids)
        for i, layer in enumerate(self.model.layers):
            key = (c.layer_groups[i], layer.self_attn.window)
            if key not in plans:
                plans[key] = AttentionPlan.build(batch, key[0], key[1], kv.block_size, device)
            x = layer(x, cos, sin, plans[key], kv.k[i], kv.v[i])
        if not all_logits:
            last = torch.cumsum(torch.tensor(batch.query_lens), 0) - 1
            x = x[last.to(device)]
        return self.lm_head(self.model.norm(x)).float()


def _as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; use one of {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def load_model(
    path: str,
    backend: str = "torch",
    device: torch.device | str = "cpu",
    dtype: torch.dtype | str = torch.float32,
    keep_mxfp4: bool | None = None,
) -> GptOssForCausalLM:
    """Build the model on device and fill it shard by shard from the checkpoint at path.

    keep_mxfp4: hold the experts packed and dequantize per use (see Experts); None
    decides by memory: packed only on a GPU where dequantized experts would not fit.
    """
    if backend == "cuda":  # kernels + FlashInfer on top of this loader (services/worker/model/cuda_backend.py)
        from services.worker.model.cuda_backend import load_cuda_model

        return load_cuda_model(path, device=device if str(device).startswith("cuda") else "cuda")
    if backend != "torch":
        raise ValueError(f"backend {backend!r} is not provided here; services.worker.model serves 'torch' and 'cuda'")
    dtype = _as_dtype(dtype)
    device = torch.device(device)
    checkpoint = Checkpoint(path)
    config = checkpoint.config
    if keep_mxfp4 is None:
        keep_mxfp4 = _experts_too_big(checkpoint, dtype, device)
    model = GptOssForCausalLM(config, dtype, keep_mxfp4)  # parameters on the meta device until loaded
    loaded: set[str] = set()
    for name, tensor in checkpoint.iter_tensors(dtype=dtype, keep_mxfp4=keep_mxfp4, device=device):
        _assign(model, name, tensor)
        loaded.add(name)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
        loaded.add("lm_head.weight")
    left = [n for n, p in model.named_parameters() if p.is_meta and n not in loaded]
    if left:
        raise CheckpointError(f"tensor {left[0]} was not loaded from {path}")
    return model.to(device).eval()


def _experts_too_big(checkpoint: Checkpoint, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether dequantized experts would take more than half the GPU's free memory."""
    if device.type != "cuda":
        return False
    free, _ = torch.cuda.mem_get_info(device)
    values = sum(2 * s.nbytes for s in checkpoint.specs.values() if s.name.endswith("_blocks"))
    return values * torch.empty((), dtype=dtype).element_size() > free // 2


def _assign(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Replace the meta parameter `name` with tensor (float32 kept for norms and sinks)."""
    module_name, _, leaf = name.rpartition(".")
    try:
        module = model.get_submodule(module_name)
        current = getattr(module, leaf)
    except AttributeError:
        raise CheckpointError(f"tensor {name} has no place in the model") from None
    if tuple(current.shape) != tuple(tensor.shape):
        raise CheckpointError(f"tensor {name} has shape {list(tensor.shape)}, expected {list(current.shape)}")
    value = tensor.to(current.dtype)
    setattr(module, leaf, nn.Parameter(value, requires_grad=False))

"""Names, shapes and dtypes of every tensor in a gpt-oss checkpoint (HF layout).

This is the one description both the generator (make_checkpoint.py) and the loader
(checkpoint.py) follow. It matches transformers' gpt_oss modeling with its MXFP4
integration and the released openai/gpt-oss-20b/120b files:

    model.embed_tokens.weight                          [vocab, hidden]            bf16
    model.layers.N.input_layernorm.weight              [hidden]                   bf16
    model.layers.N.self_attn.{q,k,v}_proj.{weight,bias} [heads*head_dim, hidden]  bf16
    model.layers.N.self_attn.o_proj.{weight,bias}      [hidden, heads*head_dim]   bf16
    model.layers.N.self_attn.sinks                     [heads]                    bf16
    model.layers.N.post_attention_layernorm.weight     [hidden]                   bf16
    model.layers.N.mlp.router.{weight,bias}            [experts, hidden]          bf16
    model.layers.N.mlp.experts.gate_up_proj_blocks     [experts, 2*inter, hidden/32, 16] uint8
    model.layers.N.mlp.experts.gate_up_proj_scales     [experts, 2*inter, hidden/32]     uint8
    model.layers.N.mlp.experts.gate_up_proj_bias       [experts, 2*inter]         bf16
    model.layers.N.mlp.experts.down_proj_blocks        [experts, hidden, inter/32, 16]   uint8
    model.layers.N.mlp.experts.down_proj_scales        [experts, hidden, inter/32]       uint8
    model.layers.N.mlp.experts.down_proj_bias          [experts, hidden]          bf16
    model.norm.weight                                  [hidden]                   bf16
    lm_head.weight                                     [vocab, hidden]            bf16 (absent when tied)

gate_up rows interleave the two projections: row 2j is gate j, row 2j+1 is up j.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from services.worker.model.config import GptOssConfig
from services.worker.model.mxfp4 import BYTES_PER_BLOCK, VALUES_PER_SCALE

EXPERT_PROJECTIONS = ("gate_up_proj", "down_proj")


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        count = 1
        for d in self.shape:
            count *= d
        return count * torch.empty((), dtype=self.dtype).element_size()


def layer_prefix(layer: int) -> str:
    return f"model.layers.{layer}."


def expected_tensors(config: GptOssConfig) -> list[TensorSpec]:
    """Every tensor of the checkpoint, in a stable order (embedding, layers, norm, head)."""
    c = config
    bf16, u8 = torch.bfloat16, torch.uint8
    specs = [TensorSpec("model.embed_tokens.weight", (c.vocab_size, c.hidden_size), bf16)]
    for layer in range(c.num_hidden_layers):
        p = layer_prefix(layer)
        experts = c.experts_in(layer)
        specs += [
            TensorSpec(p + "input_layernorm.weight", (c.hidden_size,), bf16),
            TensorSpec(p + "self_attn.q_proj.weight", (c.q_size, c.hidden_size), bf16),
            TensorSpec(p + "self_attn.q_proj.bias", (c.q_size,), bf16),
            TensorSpec(p + "self_attn.k_proj.weight", (c.kv_size, c.hidden_size), bf16),
            TensorSpec(p + "self_attn.k_proj.bias", (c.kv_size,), bf16),
            TensorSpec(p + "self_attn.v_proj.weight", (c.kv_size, c.hidden_size), bf16),
            TensorSpec(p + "self_attn.v_proj.bias", (c.kv_size,), bf16),
            TensorSpec(p + "self_attn.o_proj.weight", (c.hidden_size, c.q_size), bf16),
            TensorSpec(p + "self_attn.o_proj.bias", (c.hidden_size,), bf16),
            TensorSpec(p + "self_attn.sinks", (c.num_attention_heads,), bf16),
            TensorSpec(p + "post_attention_layernorm.weight", (c.hidden_size,), bf16),
            TensorSpec(p + "mlp.router.weight", (experts, c.hidden_size), bf16),
            TensorSpec(p + "mlp.router.bias", (experts,), bf16),
        ]
        for proj, rows, cols in (("gate_up_proj", 2 * c.intermediate_size, c.hidden_size),
                                 ("down_proj", c.hidden_size, c.intermediate_size)):
            groups = cols // VALUES_PER_SCALE
            specs += [
                TensorSpec(f"{p}mlp.experts.{proj}_blocks", (experts, rows, groups, BYTES_PER_BLOCK), u8),
                TensorSpec(f"{p}mlp.experts.{proj}_scales", (experts, rows, groups), u8),
                TensorSpec(f"{p}mlp.experts.{proj}_bias", (experts, rows), bf16),
            ]
    specs.append(TensorSpec("model.norm.weight", (c.hidden_size,), bf16))
    if not c.tie_word_embeddings:
        specs.append(TensorSpec("lm_head.weight", (c.vocab_size, c.hidden_size), bf16))
    return specs

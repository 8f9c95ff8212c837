"""The gpt-oss model configuration, read from and written to a checkpoint's HF `config.json`.

Field names are exactly Hugging Face's (`GptOssConfig` in transformers) so the file
round-trips with their tooling. Two rose extensions describe pruned or re-windowed
derivatives and are stored in the same file:

- `num_experts_per_layer`: experts kept in each layer (Puzzle-style pruning of 120b);
  None means `num_local_experts` everywhere.
- `sliding_window_per_layer`: the window of each sliding layer (None or 0 for full
  layers); None means `sliding_window` for every layer whose type is sliding.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field

from services.worker.model.errors import CheckpointError

SLIDING = "sliding_attention"
FULL = "full_attention"

# The YaRN setting every released gpt-oss model uses.
DEFAULT_ROPE_SCALING = {
    "rope_type": "yarn",
    "factor": 32.0,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
    "original_max_position_embeddings": 4096,
    "truncate": False,
}

# How the released checkpoints mark which modules stay in bf16.
DEFAULT_QUANTIZATION_CONFIG = {
    "quant_method": "mxfp4",
    "modules_to_not_convert": [
        "model.layers.*.self_attn",
        "model.layers.*.mlp.router",
        "model.embed_tokens",
        "lm_head",
    ],
}


_DERIVED_KEYS = ("architectures", "model_type", "experts_per_token")


def alternating_layer_types(num_layers: int) -> list[str]:
    """gpt-oss's pattern: even layers slide, odd layers attend to everything."""
    return [SLIDING if i % 2 == 0 else FULL for i in range(num_layers)]


@dataclass
class GptOssConfig:
    """Shapes and hyper-parameters of one gpt-oss checkpoint (defaults: gpt-oss-20b)."""

    num_hidden_layers: int = 24
    hidden_size: int = 2880
    intermediate_size: int = 2880
    num_attention_heads: int = 64
    num_key_value_heads: int = 8
    head_dim: int = 64
    num_local_experts: int = 32
    num_experts_per_tok: int = 4
    vocab_size: int = 201088
    max_position_embeddings: int = 131072
    initial_context_length: int = 4096
    sliding_window: int = 128
    layer_types: list[str] | None = None
    rope_theta: float = 150000.0
    rope_scaling: dict | None = field(default_factory=lambda: dict(DEFAULT_ROPE_SCALING))
    swiglu_limit: float = 7.0
    swiglu_alpha: float = 1.702
    rms_norm_eps: float = 1e-5
    attention_bias: bool = True
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = 200002
    pad_token_id: int | None = 199999
    quantization_config: dict | None = field(default_factory=lambda: json.loads(json.dumps(DEFAULT_QUANTIZATION_CONFIG)))
    # rose extensions (see the module docstring)
    num_experts_per_layer: list[int] | None = None
    sliding_window_per_layer: list[int | None] | None = None
    # keys of config.json this class does not model, kept so to_dict() writes them back
    extra: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.layer_types is None:
            self.layer_types = alternating_layer_types(self.num_hidden_layers)
        self.validate()

    # ------------------------------------------------------------------ reading
    @classmethod
    def from_dict(cls, raw: dict) -> "GptOssConfig":
        """From the parsed config.json; unknown keys are kept in `extra`."""
        raw = dict(raw)
        # transformers >= 5 writes `rope_parameters` (theta inside) instead of rope_theta/rope_scaling
        rope_parameters = raw.pop("rope_parameters", None)
        if rope_parameters and "rope_scaling" not in raw:
            rope_parameters = dict(rope_parameters)
            raw.setdefault("rope_theta", rope_parameters.pop("rope_theta", cls.rope_theta))
            raw["rope_scaling"] = rope_parameters if rope_parameters.get("rope_type", "default") != "default" else None
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        values = {k: v for k, v in raw.items() if k in known}
        # keys to_dict() derives itself are not "extra"
        extra = {k: v for k, v in raw.items() if k not in known and k not in _DERIVED_KEYS}
        try:
            return cls(**values, extra=extra)
        except TypeError as exc:
            raise CheckpointError(f"config.json: {exc}") from None

    @classmethod
    def from_pretrained(cls, path: str) -> "GptOssConfig":
        """From a checkpoint folder (or its config.json file)."""
        file = os.path.join(path, "config.json") if os.path.isdir(path) else path
        try:
            with open(file, encoding="utf-8") as fh:
                raw = json.load(fh)
        except FileNotFoundError:
            raise CheckpointError(f"no config.json at {file}") from None
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{file} is not valid JSON: {exc}") from None
        if not isinstance(raw, dict):
            raise CheckpointError(f"{file} must hold a JSON object")
        model_type = raw.get("model_type", "gpt_oss")
        if model_type != "gpt_oss":
            raise CheckpointError(f"{file}: model_type is {model_type!r}, expected 'gpt_oss'")
        return cls.from_dict(raw)

    # ------------------------------------------------------------------ writing
    def to_dict(self) -> dict:
        """The config.json content, in HF's key names (extensions only when set)."""
        out = dict(self.extra)
        out.update({"architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss"})
        for f in dataclasses.fields(self):
            if f.name == "extra":
                continue
            value = getattr(self, f.name)
            if f.name in ("num_experts_per_layer", "sliding_window_per_layer", "bos_token_id") and value is None:
                continue
            out[f.name] = value
        # HF's older alias, still read by some tools
        out["experts_per_token"] = self.num_experts_per_tok
        return dict(sorted(out.items()))

    def save(self, folder: str) -> str:
        """Write config.json into folder; returns the file path."""
        os.makedirs(folder, exist_ok=True)
        file = os.path.join(folder, "config.json")
        with open(file, "w", encoding="utf-8") as fh:
            json.dump(self.to_dict(), fh, indent=2)
            fh.write("\n")
        return file

    # ------------------------------------------------------------------ per layer
    @property
    def layer_groups(self) -> list[str]:
        """KV-cache group of each layer: "sliding" or "full" (see batch.py)."""
        return ["sliding" if t == SLIDING else "full" for t in self.layer_types]

    def window_of(self, layer: int) -> int | None:
        """Tokens a query of this layer sees (itself included), None for a full layer."""
        if self.layer_types[layer] != SLIDING:
            return None
        if self.sliding_window_per_layer is not None:
            return int(self.sliding_window_per_layer[layer])
        return int(self.sliding_window)

    def experts_in(self, layer: int) -> int:
        """Experts stored in this layer."""
        if self.num_experts_per_layer is not None:
            return int(self.num_experts_per_layer[layer])
        return self.num_local_experts

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @property
    def max_window(self) -> int:
        """Largest sliding window of any layer (0 when every layer is full)."""
        return max((self.window_of(i) or 0 for i in range(self.num_hidden_layers)), default=0)

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        """Raise CheckpointError naming the first inconsistent field."""
        n = self.num_hidden_layers

        def need(ok: bool, message: str) -> None:
            if not ok:
                raise CheckpointError(f"config.json: {message}")

        for name in ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "num_local_experts", "num_experts_per_tok",
                     "vocab_size", "max_position_embeddings"):
            value = getattr(self, name)
            need(isinstance(value, int) and not isinstance(value, bool) and value > 0,
                 f"{name} must be a positive integer, got {value!r}")
        need(self.num_attention_heads % self.num_key_value_heads == 0,
             f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
             f"num_key_value_heads ({self.num_key_value_heads})")
        need(self.head_dim % 2 == 0, f"head_dim must be even for rotary embedding, got {self.head_dim}")
        # MXFP4 packs 32 values per scale along the input dimension of each expert matrix
        need(self.hidden_size % 32 == 0, f"hidden_size must be a multiple of 32 (MXFP4 blocks), got {self.hidden_size}")
        need(self.intermediate_size % 32 == 0,
             f"intermediate_size must be a multiple of 32 (MXFP4 blocks), got {self.intermediate_size}")
        need(isinstance(self.layer_types, list) and len(self.layer_types) == n,
             f"layer_types must list {n} entries, got {self.layer_types!r}")
        bad = [t for t in self.layer_types if t not in (SLIDING, FULL)]
        need(not bad, f"layer_types entries must be {SLIDING!r} or {FULL!r}, got {bad[0]!r}" if bad else "")
        if self.num_experts_per_layer is not None:
            need(isinstance(self.num_experts_per_layer, list) and len(self.num_experts_per_layer) == n,
                 f"num_experts_per_layer must list {n} entries, got {self.num_experts_per_layer!r}")
            for i, e in enumerate(self.num_experts_per_layer):
                need(isinstance(e, int) and e >= self.num_experts_per_tok,
                     f"num_experts_per_layer[{i}] = {e!r}: must be an integer >= num_experts_per_tok "
                     f"({self.num_experts_per_tok})")
        else:
            need(self.num_local_experts >= self.num_experts_per_tok,
                 f"num_local_experts ({self.num_local_experts}) < num_experts_per_tok ({self.num_experts_per_tok})")
        if self.sliding_window_per_layer is not None:
            need(isinstance(self.sliding_window_per_layer, list) and len(self.sliding_window_per_layer) == n,
                 f"sliding_window_per_layer must list {n} entries, got {self.sliding_window_per_layer!r}")
        for i in range(n):
            window = self.window_of(i)
            if window is not None:
                need(isinstance(window, int) and window > 0,
                     f"layer {i} is a sliding layer and needs a positive window, got {window!r}")
        if self.rope_scaling is not None:
            need(isinstance(self.rope_scaling, dict), "rope_scaling must be an object")
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            need(kind in ("yarn", "default", None), f"rope_scaling.rope_type {kind!r} is not supported (yarn)")
            if kind == "yarn":
                for key in ("factor", "original_max_position_embeddings"):
                    need(key in self.rope_scaling, f"rope_scaling needs {key!r} for YaRN")
        need(float(self.rope_theta) > 0, f"rope_theta must be positive, got {self.rope_theta!r}")

    @property
    def eos_token_ids(self) -> list[int]:
        """eos_token_id as a list (HF allows an int or a list)."""
        if self.eos_token_id is None:
            return []
        return [self.eos_token_id] if isinstance(self.eos_token_id, int) else list(self.eos_token_id)

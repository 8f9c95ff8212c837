"""Write a seeded random gpt-oss checkpoint in the Hugging Face layout.

    config.json, generation_config.json,
    model-0000N-of-0000M.safetensors (bf16 dense weights, MXFP4 experts),
    model.safetensors.index.json

Each tensor is drawn from its own generator seeded by (seed, tensor name), so a
shard can be produced without the others: only one shard is ever in memory, and
the same seed gives byte-identical files. The index is written last, so a folder
whose index matches the plan is complete and is left as it is.

CLI: `rose make-checkpoint --out PATH [--preset tiny|20b|120b] [--layers N] [--seed S] ...`
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re

import torch
from safetensors.torch import save_file

from services.worker.model.config import FULL, SLIDING, GptOssConfig, alternating_layer_types
from services.worker.model.layout import TensorSpec, expected_tensors
from services.worker.model.mxfp4 import quantize

INDEX_FILE = "model.safetensors.index.json"
_SHARD_NAME = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
# Small shards for the tiny model so tests exercise several files; HF-sized ones otherwise.
DEFAULT_MAX_SHARD_BYTES = {"tiny": 16 * 2**20, "20b": 4 * 2**30, "120b": 4 * 2**30}

# The embedded default model: the real o200k_harmony vocabulary (so the tokenizer
# fits), everything else small enough for CPU tests. A window of 32 lets tests
# run past it; 4 layers alternate sliding/full as in the real models.
TINY_CONFIG = {
    "num_hidden_layers": 4,
    "hidden_size": 64,
    "intermediate_size": 64,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "num_local_experts": 8,
    "num_experts_per_tok": 4,
    "vocab_size": 201088,
    "sliding_window": 32,
    "max_position_embeddings": 131072,
    "initial_context_length": 4096,
}

# The released shapes (for GPU benchmarks; far too large to generate on CPU tests).
PRESETS = {
    "tiny": TINY_CONFIG,
    "20b": {"num_hidden_layers": 24, "num_local_experts": 32},
    "120b": {"num_hidden_layers": 36, "num_local_experts": 128},
}

GENERATION_CONFIG = {
    "bos_token_id": 199998,
    "do_sample": True,
    "eos_token_id": [200002, 199999, 200012],  # <|return|>, <|endoftext|>, <|call|>
    "pad_token_id": 199999,
}


def preset_config(preset: str = "tiny", **overrides) -> GptOssConfig:
    """The config of a preset with field overrides (layer_types follows num_hidden_layers)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    values = dict(PRESETS[preset])
    values.update(overrides)
    if "layer_types" not in overrides:
        values["layer_types"] = alternating_layer_types(values.get("num_hidden_layers", 24))
    return GptOssConfig(**values)


def make_checkpoint(
    path: str,
    seed: int = 0,
    preset: str = "tiny",
    max_shard_bytes: int | None = None,
    device: str | torch.device = "cpu",
    **config_overrides,
) -> str:
    """Write (or keep, if already complete) a random checkpoint at path; returns path.

    device: where the values are drawn and quantized. "cuda" makes the 20b/120b shapes in
    seconds instead of many CPU minutes; its random stream differs from the CPU's, so the
    index records the device and the same seed gives the same bytes per device.
    """
    config = preset_config(preset, **config_overrides)
    shards = plan_shards(expected_tensors(config), max_shard_bytes or DEFAULT_MAX_SHARD_BYTES[preset])
    device = torch.device(device)
    index = build_index(shards, seed, device.type)
    if _is_complete(path, config, index):
        return path
    os.makedirs(path, exist_ok=True)
    # an index is the mark of a complete folder: drop it (and shards of an older plan) first
    planned = {file_name for file_name, _ in shards}
    for name in os.listdir(path):
        if name == INDEX_FILE or (_SHARD_NAME.fullmatch(name) and name not in planned):
            os.remove(os.path.join(path, name))
    _write_json(os.path.join(path, "config.json"), config.to_dict())
    _write_json(os.path.join(path, "generation_config.json"), _generation_config(config))
    for file_name, specs in shards:
        tensors = {spec.name: t.cpu() for spec, t in _generate(specs, config, seed, device)}
        tmp = os.path.join(path, f"{file_name}.{os.getpid()}.tmp")  # unique: two writers may race
        save_file(tensors, tmp, metadata={"format": "pt"})
        os.replace(tmp, os.path.join(path, file_name))
        del tensors
    _write_json(os.path.join(path, INDEX_FILE), index)
    return path


# ---------------------------------------------------------------------- plan
def plan_shards(specs: list[TensorSpec], max_shard_bytes: int) -> list[tuple[str, list[TensorSpec]]]:
    """Group tensors in order into shards of at most max_shard_bytes (a larger tensor goes alone)."""
    groups: list[list[TensorSpec]] = []
    size = 0
    for spec in specs:
        if not groups or (size + spec.nbytes > max_shard_bytes and groups[-1]):
            groups.append([])
            size = 0
        groups[-1].append(spec)
        size += spec.nbytes
    total = len(groups)
    return [(f"model-{i + 1:05d}-of-{total:05d}.safetensors", g) for i, g in enumerate(groups)]


def build_index(shards: list[tuple[str, list[TensorSpec]]], seed: int, device_type: str = "cpu") -> dict:
    """model.safetensors.index.json: total_size plus tensor -> shard file."""
    weight_map = {spec.name: file_name for file_name, specs in shards for spec in specs}
    total = sum(spec.nbytes for _, specs in shards for spec in specs)
    metadata = {"total_size": total, "rose_seed": seed}
    if device_type != "cpu":
        metadata["rose_device"] = device_type
    return {"metadata": metadata, "weight_map": dict(sorted(weight_map.items()))}


def _is_complete(path: str, config: GptOssConfig, index: dict) -> bool:
    try:
        with open(os.path.join(path, INDEX_FILE), encoding="utf-8") as fh:
            existing_index = json.load(fh)
        with open(os.path.join(path, "config.json"), encoding="utf-8") as fh:
            existing_config = json.load(fh)
    except (OSError, ValueError):
        return False
    files = set(index["weight_map"].values())
    return (
        existing_index == index
        and existing_config == json.loads(json.dumps(config.to_dict()))
        and all(os.path.isfile(os.path.join(path, f)) for f in files)
    )


def _generation_config(config: GptOssConfig) -> dict:
    out = dict(GENERATION_CONFIG)
    # a shrunken test vocabulary cannot hold the real special ids
    if config.vocab_size <= max(out["eos_token_id"]):
        out.update(eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id, bos_token_id=config.bos_token_id)
    return out


def _write_json(file: str, data: dict) -> None:
    tmp = f"{file}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2)
        fh.write("\n")
    os.replace(tmp, file)


# ---------------------------------------------------------------------- values
def _generator(seed: int, name: str, device: torch.device = torch.device("cpu")) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return torch.Generator(device).manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def _std_of(name: str, config: GptOssConfig) -> tuple[float, float]:
    """(mean, std) of a tensor's values, chosen so activations stay O(1) and logits spread."""
    h, inter = config.hidden_size, config.intermediate_size
    if name.endswith("layernorm.weight") or name == "model.norm.weight":
        return 1.0, 0.1
    if name.endswith("_proj.bias") or name.endswith("router.bias") or name.endswith("proj_bias"):
        return 0.0, 0.1
    if name.endswith("sinks"):
        return 0.0, 1.0
    if name == "model.embed_tokens.weight":
        return 0.0, 1.0
    if name == "lm_head.weight":
        return 0.0, 3.0 / math.sqrt(h)
    if ".o_proj." in name:
        return 0.0, 1.0 / math.sqrt(config.q_size)
    if "down_proj" in name:
        return 0.0, 1.0 / math.sqrt(inter)
    return 0.0, 1.0 / math.sqrt(h)  # q/k/v, router, gate_up


def _generate(specs: list[TensorSpec], config: GptOssConfig, seed: int, device: torch.device = torch.device("cpu")):
    """Yield (spec, tensor) for each spec; MXFP4 pairs come from one float matrix."""
    floats: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for spec in specs:
        if spec.name.endswith("_blocks") or spec.name.endswith("_scales"):
            base = spec.name.rsplit("_", 1)[0]  # ...experts.gate_up_proj
            if base not in floats:
                experts, rows, groups = spec.shape[:3]
                mean, std = _std_of(base, config)
                generator = _generator(seed, base, device)
                # one expert at a time keeps quantize's temporaries small on the 20b/120b shapes
                packed = [quantize(torch.randn((rows, groups * 32), generator=generator, device=device) * std + mean)
                          for _ in range(experts)]
                floats[base] = (torch.stack([b for b, _ in packed]), torch.stack([s for _, s in packed]))
                del packed
            blocks, scales = floats[base]
            yield spec, (blocks if spec.name.endswith("_blocks") else scales)
            continue
        mean, std = _std_of(spec.name, config)
        values = torch.randn(spec.shape, generator=_generator(seed, spec.name, device), device=device) * std + mean
        yield spec, values.to(spec.dtype)


# ---------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default=None, help="checkpoint folder to write (default: the --model path)")
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="shape preset")
    parser.add_argument("--seed", type=int, default=0, help="random seed (same seed, same bytes)")
    parser.add_argument("--layers", type=int, default=None, help="num_hidden_layers")
    parser.add_argument("--vocab-size", type=int, default=None, help="vocab_size (default: the real 201088)")
    parser.add_argument("--experts", type=int, default=None, help="num_local_experts")
    parser.add_argument("--experts-per-layer", default=None,
                        help="comma-separated experts kept in each layer (pruned derivatives)")
    parser.add_argument("--sliding-window", type=int, default=None, help="window of the sliding layers")
    parser.add_argument("--layer-types", default=None,
                        help="comma-separated 'sliding'/'full' per layer (default: alternating)")
    parser.add_argument("--max-shard-mb", type=float, default=None,
                        help="largest shard file in MiB (default 16 for tiny, 4096 for 20b/120b)")
    parser.add_argument("--print-config", action="store_true", help="print config.json and write nothing")
    parser.add_argument("--generate-on", default="cpu", metavar="DEVICE",
                        help="torch device that draws the values: cpu (default) or cuda (seconds for 20b/120b)")


def overrides_from_args(args: argparse.Namespace) -> dict:
    """Config overrides named by the CLI flags; ValueError on malformed lists."""
    out: dict = {}
    if args.layers is not None:
        out["num_hidden_layers"] = args.layers
    if args.vocab_size is not None:
        out["vocab_size"] = args.vocab_size
    if args.experts is not None:
        out["num_local_experts"] = args.experts
    if args.sliding_window is not None:
        out["sliding_window"] = args.sliding_window
    if args.experts_per_layer:
        try:
            out["num_experts_per_layer"] = [int(x) for x in args.experts_per_layer.split(",")]
        except ValueError:
            raise ValueError(f"--experts-per-layer must be comma-separated integers, got {args.experts_per_layer!r}") from None
    if args.layer_types:
        names = {"sliding": SLIDING, "full": FULL, SLIDING: SLIDING, FULL: FULL}
        kinds = [x.strip() for x in args.layer_types.split(",")]
        unknown = [k for k in kinds if k not in names]
        if unknown:
            raise ValueError(f"--layer-types entries must be 'sliding' or 'full', got {unknown[0]!r}")
        out["layer_types"] = [names[k] for k in kinds]
    return out


def main(settings, args) -> int:
    from services.worker.model.errors import CheckpointError

    try:
        if args.max_shard_mb is not None and args.max_shard_mb <= 0:
            raise ValueError(f"--max-shard-mb must be positive, got {args.max_shard_mb}")
        overrides = overrides_from_args(args)
        config = preset_config(args.preset, **overrides)
    except (ValueError, CheckpointError) as exc:
        print(f"make-checkpoint: {exc}")
        return 2
    if args.print_config:
        print(json.dumps(config.to_dict(), indent=2))
        return 0
    out = args.out or settings.model_path
    shard_bytes = int(args.max_shard_mb * 2**20) if args.max_shard_mb else None
    make_checkpoint(out, seed=args.seed, preset=args.preset, max_shard_bytes=shard_bytes, device=args.generate_on,
                    **overrides)
    print(f"checkpoint written to {out}")
    return 0

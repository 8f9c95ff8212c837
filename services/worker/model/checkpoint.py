"""Read a gpt-oss checkpoint in the Hugging Face layout, one shard at a time.

    ckpt = Checkpoint(path)                      # config + index, checked against the layout
    for name, tensor in ckpt.iter_tensors():     # dense bf16 -> dtype, experts dequantized
        ...
    state = ckpt.load_state(keep_mxfp4=True)     # blocks/scales as stored (GPU backends)

Every tensor the layout expects must be in the index and its shard with the right
shape, else CheckpointError names it. Only one shard is open at a time and each
tensor is handed out as soon as it is read, so a caller that moves tensors into a
model never holds two copies of the weights.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator

import torch
from safetensors import safe_open

from services.worker.model.config import GptOssConfig
from services.worker.model.errors import CheckpointError
from services.worker.model.layout import TensorSpec, expected_tensors
from services.worker.model.mxfp4 import dequantize

log = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_SAFETENSORS_DTYPES = {
    "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "U8": torch.uint8,
    "I8": torch.int8, "I32": torch.int32, "I64": torch.int64, "F64": torch.float64,
}


class Checkpoint:
    """A checkpoint folder: its config, and which shard holds each tensor."""

    def __init__(self, path: str):
        if not os.path.isdir(path):
            raise CheckpointError(f"checkpoint folder {path} does not exist")
        self.path = path
        self.config = GptOssConfig.from_pretrained(path)
        self.specs: dict[str, TensorSpec] = {s.name: s for s in expected_tensors(self.config)}
        self.weight_map = self._read_weight_map()
        missing = [name for name in self.specs if name not in self.weight_map]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise CheckpointError(f"{path}: tensor {missing[0]} is missing{more}")
        unused = sorted(set(self.weight_map) - set(self.specs))
        if unused:
            log.warning("%s: ignoring %d tensors gpt-oss does not use, e.g. %s", path, len(unused), unused[0])

    def _read_weight_map(self) -> dict[str, str]:
        index_file = os.path.join(self.path, INDEX_FILE)
        if os.path.isfile(index_file):
            try:
                with open(index_file, encoding="utf-8") as fh:
                    weight_map = json.load(fh)["weight_map"]
            except (ValueError, KeyError, TypeError) as exc:
                raise CheckpointError(f"{index_file} is not a safetensors index: {exc}") from None
            return dict(weight_map)
        single = os.path.join(self.path, SINGLE_FILE)
        if os.path.isfile(single):
            with safe_open(single, framework="pt") as f:
                return {name: SINGLE_FILE for name in f.keys()}
        raise CheckpointError(f"{self.path}: neither {INDEX_FILE} nor {SINGLE_FILE} found")

    def shards(self) -> list[str]:
        """Shard files in index order, each listed once."""
        return list(dict.fromkeys(self.weight_map[name] for name in self.specs))

    def iter_raw(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor as stored) for every expected tensor, shard by shard, shapes checked."""
        by_shard: dict[str, list[str]] = {}
        for name in self.specs:
            by_shard.setdefault(self.weight_map[name], []).append(name)
        for shard, names in by_shard.items():
            file = os.path.join(self.path, shard)
            if not os.path.isfile(file):
                raise CheckpointError(f"shard {shard} (holding {names[0]}) is missing from {self.path}")
            try:
                handle = safe_open(file, framework="pt")
            except Exception as exc:  # safetensors raises its own error types for corrupt headers
                raise CheckpointError(f"shard {shard} cannot be read: {exc}") from None
            with handle as f:
                present = set(f.keys())
                for name in names:
                    if name not in present:
                        raise CheckpointError(f"tensor {name} is missing from shard {shard}")
                    self._check(name, f.get_slice(name))
                    yield name, f.get_tensor(name)

    def _check(self, name: str, tensor_slice) -> None:
        spec = self.specs[name]
        shape = tuple(tensor_slice.get_shape())
        if shape != spec.shape:
            raise CheckpointError(f"tensor {name} has shape {list(shape)}, expected {list(spec.shape)}")
        dtype = _SAFETENSORS_DTYPES.get(tensor_slice.get_dtype())
        if spec.dtype == torch.uint8 and dtype != torch.uint8:
            raise CheckpointError(f"tensor {name} has dtype {tensor_slice.get_dtype()}, expected U8 (MXFP4)")
        if spec.dtype != torch.uint8 and dtype not in _FLOAT_DTYPES:
            raise CheckpointError(f"tensor {name} has dtype {tensor_slice.get_dtype()}, expected a float type")

    def iter_tensors(
        self, dtype: torch.dtype = torch.float32, keep_mxfp4: bool = False, device: torch.device | str = "cpu"
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor) with floats cast to dtype on device.

        keep_mxfp4=False: each expert projection comes out once, dequantized, as
        `...mlp.experts.gate_up_proj` [experts, 2*inter, hidden] / `...down_proj`
        [experts, hidden, inter] (rows = outputs, as stored). keep_mxfp4=True: the
        `_blocks`/`_scales` uint8 tensors come out as stored.
        """
        pending: dict[str, dict[str, torch.Tensor]] = {}  # a projection waiting for its other half
        for name, tensor in self.iter_raw():
            if tensor.dtype == torch.uint8:
                if keep_mxfp4:
                    yield name, tensor.to(device)
                    continue
                base, part = name.rsplit("_", 1)
                halves = pending.setdefault(base, {})
                halves[part] = tensor
                if len(halves) == 2:
                    del pending[base]
                    blocks, scales = halves["blocks"].to(device), halves["scales"].to(device)
                    yield base, dequantize(blocks, scales, dtype)
                continue
            yield name, tensor.to(device=device, dtype=dtype)

    def load_state(
        self, dtype: torch.dtype = torch.float32, keep_mxfp4: bool = False, device: torch.device | str = "cpu"
    ) -> dict[str, torch.Tensor]:
        """Every tensor at once (see iter_tensors for names and layouts)."""
        return dict(self.iter_tensors(dtype=dtype, keep_mxfp4=keep_mxfp4, device=device))

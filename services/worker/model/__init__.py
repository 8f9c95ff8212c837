"""The gpt-oss model: config, checkpoint format (HF layout, MXFP4 experts), loader and torch forward pass."""

from services.worker.model.batch import NO_BLOCK, ForwardBatch, PagedKVCache
from services.worker.model.checkpoint import Checkpoint
from services.worker.model.config import GptOssConfig
from services.worker.model.errors import CheckpointError
from services.worker.model.make_checkpoint import TINY_CONFIG, make_checkpoint
from services.worker.model.torch_model import GptOssForCausalLM, load_model

__all__ = [
    "NO_BLOCK",
    "Checkpoint",
    "CheckpointError",
    "ForwardBatch",
    "GptOssConfig",
    "GptOssForCausalLM",
    "PagedKVCache",
    "TINY_CONFIG",
    "load_model",
    "make_checkpoint",
]

"""Automatic KV cache sizing (num_kv_blocks 0) against the memory bound."""

from __future__ import annotations

import math

import pytest

from services.worker.engine import kv_sizing
from services.worker.engine.kv_sizing import block_bytes, kv_blocks_per_group
from shared.config import Settings


def test_explicit_block_count_is_used_for_every_group(small_model):
    blocks = kv_blocks_per_group(small_model, Settings(num_kv_blocks=77), max_model_len=128)
    assert blocks == {"sliding": 77, "full": 77}


def test_small_context_gets_every_sequence_its_room(small_model):
    settings = Settings(max_num_seqs=8, block_size=16, max_num_batched_tokens=64)
    blocks = kv_blocks_per_group(small_model, settings, max_model_len=512)
    assert blocks["full"] == 8 * 32
    # each sequence's 16-token window (+1 kept) spans at most 3 blocks, plus one prefill chunk
    assert blocks["sliding"] == 8 * (math.ceil(17 / 16) + 1) + 4


def test_long_context_is_bounded_by_memory(small_model):
    settings = Settings(max_num_seqs=64, block_size=16)
    blocks = kv_blocks_per_group(small_model, settings, max_model_len=131072)
    used = sum(n * block_bytes(small_model, g, 16) for g, n in blocks.items())
    assert used <= kv_sizing.memory_budget(small_model.device)
    assert blocks["full"] >= 131072 // 16  # still one whole-context sequence
    assert blocks["full"] < 64 * (131072 // 16)
    # the sliding group keeps a window for all 64 sequences plus a prefill chunk
    assert blocks["sliding"] == 64 * (math.ceil(17 / 16) + 1) + 2048 // 16


def test_impossible_context_is_a_clear_error(small_model, monkeypatch):
    monkeypatch.setattr(kv_sizing, "CPU_KV_CAP_BYTES", 1 << 20)
    with pytest.raises(ValueError, match="lower --max-model-len"):
        kv_blocks_per_group(small_model, Settings(block_size=16), max_model_len=131072)

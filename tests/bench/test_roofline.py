"""bench/roofline.py: the bytes a decode step reads agree with the checkpoint layout."""

from __future__ import annotations

import pytest

from bench.roofline import decode_bound, distinct_experts, expert_bytes, kv_bytes_per_token, step_weight_bytes
from services.worker.model.layout import expected_tensors
from services.worker.model.make_checkpoint import preset_config


@pytest.mark.parametrize("preset", ["tiny", "20b", "120b"])
def test_every_expert_hit_reads_the_whole_checkpoint_once(preset):
    config = preset_config(preset)
    total = sum(spec.nbytes for spec in expected_tensors(config))
    embedding = config.vocab_size * config.hidden_size * 2
    batch = 10_000  # every expert of every layer is routed to
    assert step_weight_bytes(config, batch) == pytest.approx(total - embedding + batch * config.hidden_size * 2, rel=1e-6)


def test_batch_one_reads_top_k_experts():
    config = preset_config("20b")
    assert distinct_experts(32, 4, 1) == pytest.approx(4)
    one = step_weight_bytes(config, 1)
    two = step_weight_bytes(config, 2)
    extra = config.num_hidden_layers * (distinct_experts(32, 4, 2) - 4) * expert_bytes(config) + config.hidden_size * 2
    assert two - one == pytest.approx(extra, abs=2)
    # gpt-oss-20b: about 3.6B active parameters, experts in MXFP4 (4.25 bits), the rest bf16
    assert 3.0e9 < one < 4.5e9


def test_kv_read_caps_sliding_layers_at_the_window():
    config = preset_config("20b")  # 12 sliding layers (window 128), 12 full
    per_position = 2 * config.num_key_value_heads * config.head_dim * 2
    assert kv_bytes_per_token(config, 100, 2) == 24 * 100 * per_position
    assert kv_bytes_per_token(config, 1000, 2) == (12 * 128 + 12 * 1000) * per_position
    bound = decode_bound(config, 1e12, 4, 1000, 2)
    assert bound.kv_bytes == 4 * kv_bytes_per_token(config, 1000, 2)
    assert bound.tokens_per_s == pytest.approx(4 / bound.step_s)

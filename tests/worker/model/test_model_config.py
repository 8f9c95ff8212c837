"""GptOssConfig: HF names, round trips through config.json, per-layer overrides, presets, validation."""

from __future__ import annotations

import json

import pytest

from services.worker.model import CheckpointError, GptOssConfig
from services.worker.model.layout import expected_tensors
from services.worker.model.make_checkpoint import TINY_CONFIG, preset_config


def test_round_trip_through_config_json(tmp_path):
    config = preset_config("tiny", num_experts_per_layer=[8, 6, 4, 8], sliding_window_per_layer=[32, None, 16, None])
    config.save(str(tmp_path))
    again = GptOssConfig.from_pretrained(str(tmp_path))
    assert again == config
    assert again.to_dict() == config.to_dict()
    raw = json.loads((tmp_path / "config.json").read_text())
    assert raw["model_type"] == "gpt_oss" and raw["architectures"] == ["GptOssForCausalLM"]
    assert raw["num_experts_per_layer"] == [8, 6, 4, 8]
    assert raw["rope_scaling"]["rope_type"] == "yarn" and raw["rope_theta"] == 150000.0


def test_unknown_keys_survive_a_round_trip():
    raw = preset_config("tiny").to_dict()
    raw["some_future_field"] = {"a": 1}
    assert GptOssConfig.from_dict(raw).to_dict()["some_future_field"] == {"a": 1}


def test_transformers_reads_our_config(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = preset_config("tiny")
    config.save(str(tmp_path))
    theirs = transformers.AutoConfig.from_pretrained(str(tmp_path))
    assert type(theirs).__name__ == "GptOssConfig"
    for name in ("num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                 "num_local_experts", "num_experts_per_tok", "intermediate_size", "sliding_window", "layer_types",
                 "vocab_size", "swiglu_limit", "rms_norm_eps"):
        assert getattr(theirs, name) == getattr(config, name), name
    assert theirs.rope_parameters["factor"] == 32.0
    assert theirs.rope_parameters["rope_theta"] == 150000.0
    # and their newer `rope_parameters` spelling reads back into ours
    theirs.save_pretrained(str(tmp_path / "hf"))
    back = GptOssConfig.from_pretrained(str(tmp_path / "hf"))
    assert back.rope_theta == 150000.0 and back.rope_scaling["factor"] == 32.0
    assert back.layer_groups == config.layer_groups


def test_layer_groups_and_windows():
    config = preset_config("tiny", layer_types=["sliding_attention", "full_attention", "sliding_attention",
                                                "sliding_attention"], sliding_window_per_layer=[32, None, 8, 64])
    assert config.layer_groups == ["sliding", "full", "sliding", "sliding"]
    assert [config.window_of(i) for i in range(4)] == [32, None, 8, 64]
    assert config.max_window == 64
    plain = preset_config("tiny")
    assert plain.layer_groups == ["sliding", "full", "sliding", "full"]
    assert [plain.window_of(i) for i in range(4)] == [32, None, 32, None]
    assert [plain.experts_in(i) for i in range(4)] == [8] * 4


def _parameter_count(config: GptOssConfig) -> float:
    """Parameters counting each MXFP4 byte as two values and ignoring scales."""
    total = 0
    for spec in expected_tensors(config):
        n = 1
        for d in spec.shape:
            n *= d
        if spec.name.endswith("_blocks"):
            total += 2 * n
        elif not spec.name.endswith("_scales"):
            total += n
    return total / 1e9


def test_presets_have_the_released_shapes():
    small, large = preset_config("20b"), preset_config("120b")
    assert (small.num_hidden_layers, small.num_local_experts, small.hidden_size, small.head_dim) == (24, 32, 2880, 64)
    assert (large.num_hidden_layers, large.num_local_experts, large.num_attention_heads) == (36, 128, 64)
    # the model cards: 21B and 117B parameters
    assert 20.5 < _parameter_count(small) < 21.5
    assert 116 < _parameter_count(large) < 118
    assert TINY_CONFIG["vocab_size"] == 201088 == small.vocab_size


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"num_attention_heads": 3}, "multiple of"),
        ({"hidden_size": 48}, "hidden_size must be a multiple of 32"),
        ({"layer_types": ["sliding_attention"] * 3}, "layer_types must list 4"),
        ({"layer_types": ["sliding_attention", "full_attention", "local", "full_attention"]}, "'local'"),
        ({"num_experts_per_layer": [8, 8, 2, 8]}, r"num_experts_per_layer\[2\]"),
        ({"sliding_window_per_layer": [32, None, 0, None]}, "layer 2 is a sliding layer"),
        ({"num_hidden_layers": 0}, "num_hidden_layers must be a positive integer"),
        ({"rope_scaling": {"rope_type": "longrope"}}, "not supported"),
    ],
)
def test_inconsistent_configs_raise_naming_the_field(overrides, message):
    with pytest.raises(CheckpointError, match=message):
        preset_config("tiny", **overrides)


def test_bad_config_files(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        GptOssConfig.from_pretrained(str(tmp_path))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        GptOssConfig.from_pretrained(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(CheckpointError, match="'llama'"):
        GptOssConfig.from_pretrained(str(tmp_path))

"""`rose make-checkpoint`: flags reach the config, presets print, bad flags fail cleanly."""

from __future__ import annotations

import json
import os

from services.cli import main as rose
from services.worker.model import GptOssConfig, load_model


def test_writes_a_checkpoint_with_the_flags(tmp_path):
    out = str(tmp_path / "ckpt")
    rc = rose(["make-checkpoint", "--out", out, "--layers", "3", "--vocab-size", "256", "--seed", "7",
               "--experts-per-layer", "8,6,4", "--layer-types", "sliding,full,sliding", "--sliding-window", "16"])
    assert rc == 0
    config = GptOssConfig.from_pretrained(out)
    assert config.num_hidden_layers == 3 and config.vocab_size == 256 and config.sliding_window == 16
    assert config.num_experts_per_layer == [8, 6, 4]
    assert config.layer_groups == ["sliding", "full", "sliding"]
    index = json.load(open(os.path.join(out, "model.safetensors.index.json")))
    assert index["metadata"]["rose_seed"] == 7
    assert load_model(out).model.layers[2].mlp.experts.gate_up_proj.shape[0] == 4


def test_prints_the_120b_config_without_writing(tmp_path, capsys):
    out = tmp_path / "big"
    assert rose(["make-checkpoint", "--out", str(out), "--preset", "120b", "--print-config"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["num_hidden_layers"] == 36 and printed["num_local_experts"] == 128
    assert printed["hidden_size"] == 2880 and printed["vocab_size"] == 201088
    assert printed["quantization_config"]["quant_method"] == "mxfp4"
    assert not out.exists()


def test_bad_flags_fail_with_a_message(tmp_path, capsys):
    out = str(tmp_path / "bad")
    assert rose(["make-checkpoint", "--out", out, "--layer-types", "sliding,local"]) == 2
    assert "'local'" in capsys.readouterr().out
    assert rose(["make-checkpoint", "--out", out, "--layers", "2", "--experts-per-layer", "8,x"]) == 2
    assert "--experts-per-layer" in capsys.readouterr().out
    assert rose(["make-checkpoint", "--out", out, "--layers", "2", "--experts-per-layer", "8,8,8"]) == 2
    assert "num_experts_per_layer must list 2" in capsys.readouterr().out
    assert not os.path.exists(out)

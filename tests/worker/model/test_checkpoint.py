"""The checkpoint writer and loader: HF layout, determinism, streaming, and clear errors."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from services.worker.model import Checkpoint, CheckpointError, make_checkpoint
from services.worker.model.make_checkpoint import INDEX_FILE
from services.worker.model.mxfp4 import dequantize

SMALL = dict(vocab_size=256, pad_token_id=None, eos_token_id=None, num_hidden_layers=2)
SHARD = 64 * 1024  # small shards so the tiny model spans several files


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory) -> str:
    return make_checkpoint(str(tmp_path_factory.mktemp("ckpt") / "small"), seed=3, max_shard_bytes=SHARD, **SMALL)


def _copy(src: str, dst) -> str:
    dst = str(dst)
    shutil.copytree(src, dst)
    return dst


def test_files_follow_the_hf_layout(small_checkpoint):
    files = sorted(os.listdir(small_checkpoint))
    shards = [f for f in files if f.endswith(".safetensors")]
    assert {"config.json", "generation_config.json", INDEX_FILE} <= set(files)
    assert len(shards) > 1
    assert shards == [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    index = json.load(open(os.path.join(small_checkpoint, INDEX_FILE)))
    assert set(index["weight_map"].values()) == set(shards)
    on_disk = {}
    for shard in shards:
        with safe_open(os.path.join(small_checkpoint, shard), framework="pt") as f:
            assert f.metadata() == {"format": "pt"}
            for name in f.keys():
                on_disk[name] = (f.get_slice(name).get_dtype(), tuple(f.get_slice(name).get_shape()))
                assert index["weight_map"][name] == shard
    assert index["metadata"]["total_size"] > 0
    # the released checkpoints' names, dtypes and shapes (hidden 64, 4 heads of 16, 2 kv heads, 8 experts, inter 64)
    p = "model.layers.1."
    assert on_disk[p + "mlp.experts.gate_up_proj_blocks"] == ("U8", (8, 128, 2, 16))
    assert on_disk[p + "mlp.experts.gate_up_proj_scales"] == ("U8", (8, 128, 2))
    assert on_disk[p + "mlp.experts.gate_up_proj_bias"] == ("BF16", (8, 128))
    assert on_disk[p + "mlp.experts.down_proj_blocks"] == ("U8", (8, 64, 2, 16))
    assert on_disk[p + "mlp.experts.down_proj_bias"] == ("BF16", (8, 64))
    assert on_disk[p + "mlp.router.weight"] == ("BF16", (8, 64))
    assert on_disk[p + "self_attn.q_proj.weight"] == ("BF16", (64, 64))
    assert on_disk[p + "self_attn.k_proj.bias"] == ("BF16", (32,))
    assert on_disk[p + "self_attn.o_proj.weight"] == ("BF16", (64, 64))
    assert on_disk[p + "self_attn.sinks"] == ("BF16", (4,))
    assert on_disk["model.embed_tokens.weight"] == ("BF16", (256, 64))
    assert on_disk["lm_head.weight"] == ("BF16", (256, 64))
    assert on_disk["model.norm.weight"] == ("BF16", (64,))
    assert len(on_disk) == 2 + 1 + 2 * 19


def test_same_seed_same_bytes_and_a_complete_folder_is_kept(small_checkpoint, tmp_path):
    again = make_checkpoint(str(tmp_path / "again"), seed=3, max_shard_bytes=SHARD, **SMALL)
    for name in os.listdir(small_checkpoint):
        with open(os.path.join(small_checkpoint, name), "rb") as a, open(os.path.join(again, name), "rb") as b:
            assert a.read() == b.read(), name
    stamps = {n: os.stat(os.path.join(again, n)).st_mtime_ns for n in os.listdir(again)}
    make_checkpoint(again, seed=3, max_shard_bytes=SHARD, **SMALL)
    assert stamps == {n: os.stat(os.path.join(again, n)).st_mtime_ns for n in os.listdir(again)}
    other = make_checkpoint(str(tmp_path / "other"), seed=4, max_shard_bytes=SHARD, **SMALL)
    a = load_file(os.path.join(small_checkpoint, "model-00001-of-00004.safetensors"))
    b = load_file(os.path.join(other, "model-00001-of-00004.safetensors"))
    assert not torch.equal(a["model.embed_tokens.weight"], b["model.embed_tokens.weight"])


def test_an_interrupted_folder_is_completed(small_checkpoint, tmp_path):
    broken = _copy(small_checkpoint, tmp_path / "broken")
    os.remove(os.path.join(broken, INDEX_FILE))
    os.remove(os.path.join(broken, "model-00002-of-00004.safetensors"))
    make_checkpoint(broken, seed=3, max_shard_bytes=SHARD, **SMALL)
    assert sorted(os.listdir(broken)) == sorted(os.listdir(small_checkpoint))
    Checkpoint(broken).load_state()


def test_loader_dequantizes_or_hands_out_packed_experts(small_checkpoint):
    ckpt = Checkpoint(small_checkpoint)
    packed = ckpt.load_state(keep_mxfp4=True)
    dense = ckpt.load_state(dtype=torch.float32)
    name = "model.layers.0.mlp.experts.gate_up_proj"
    assert packed[name + "_blocks"].dtype == torch.uint8
    assert name + "_blocks" not in dense and dense[name].shape == (8, 128, 64)
    assert torch.equal(dense[name], dequantize(packed[name + "_blocks"], packed[name + "_scales"]))
    assert dense["model.embed_tokens.weight"].dtype == torch.float32
    # weights are spread so activations are neither vanishing nor huge
    assert 0.05 < dense[name].std() < 0.5
    # streaming: the iterator hands tensors out one shard after the other
    shards = [ckpt.weight_map[n] for n, _ in ckpt.iter_raw()]
    assert shards == sorted(shards)


def test_missing_tensor_is_named(small_checkpoint, tmp_path):
    broken = _copy(small_checkpoint, tmp_path / "missing")
    victim = "model.layers.1.self_attn.sinks"
    shard = os.path.join(broken, json.load(open(os.path.join(broken, INDEX_FILE)))["weight_map"][victim])
    tensors = load_file(shard)
    del tensors[victim]
    save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=f"tensor {victim} is missing"):
        Checkpoint(broken).load_state()
    # and when the index does not list it either
    index_file = os.path.join(broken, INDEX_FILE)
    index = json.load(open(index_file))
    del index["weight_map"][victim]
    json.dump(index, open(index_file, "w"))
    with pytest.raises(CheckpointError, match=f"tensor {victim} is missing"):
        Checkpoint(broken)


def test_misshaped_tensor_is_named(small_checkpoint, tmp_path):
    broken = _copy(small_checkpoint, tmp_path / "misshaped")
    victim = "model.layers.0.mlp.experts.down_proj_scales"
    shard = os.path.join(broken, json.load(open(os.path.join(broken, INDEX_FILE)))["weight_map"][victim])
    tensors = load_file(shard)
    tensors[victim] = tensors[victim][:, :-1].contiguous()
    save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=rf"tensor {victim} has shape \[8, 63, 2\], expected \[8, 64, 2\]"):
        Checkpoint(broken).load_state()


def test_missing_shard_and_folder(small_checkpoint, tmp_path):
    broken = _copy(small_checkpoint, tmp_path / "noshard")
    os.remove(os.path.join(broken, "model-00003-of-00004.safetensors"))
    with pytest.raises(CheckpointError, match="shard model-00003-of-00004.safetensors"):
        Checkpoint(broken).load_state()
    with pytest.raises(CheckpointError, match="does not exist"):
        Checkpoint(str(tmp_path / "nowhere"))


def test_per_layer_expert_counts_are_written_and_loaded(tmp_path):
    path = make_checkpoint(str(tmp_path / "pruned"), seed=0, num_experts_per_layer=[8, 5], **SMALL)
    state = Checkpoint(path).load_state()
    assert state["model.layers.0.mlp.experts.down_proj"].shape == (8, 64, 64)
    assert state["model.layers.1.mlp.experts.down_proj"].shape == (5, 64, 64)
    assert state["model.layers.1.mlp.router.bias"].shape == (5,)


def test_a_single_file_checkpoint_loads_and_extra_tensors_are_ignored(small_checkpoint, tmp_path, caplog):
    single = tmp_path / "single"
    single.mkdir()
    shutil.copy(os.path.join(small_checkpoint, "config.json"), single / "config.json")
    tensors = dict(Checkpoint(small_checkpoint).iter_raw())
    tensors["model.rotary_emb.inv_freq"] = torch.ones(8)
    save_file(tensors, str(single / "model.safetensors"), metadata={"format": "pt"})
    with caplog.at_level("WARNING"):
        state = Checkpoint(str(single)).load_state()
    assert "model.rotary_emb.inv_freq" not in state and "ignoring 1 tensors" in caplog.text
    reference = Checkpoint(small_checkpoint).load_state()
    assert state.keys() == reference.keys()
    assert all(torch.equal(state[n], reference[n]) for n in state)


def test_rewriting_with_another_plan_leaves_no_stale_shards(small_checkpoint, tmp_path):
    folder = _copy(small_checkpoint, tmp_path / "replan")
    make_checkpoint(folder, seed=3, max_shard_bytes=1 << 30, **SMALL)
    shards = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
    assert shards == ["model-00001-of-00001.safetensors"]
    assert not [f for f in os.listdir(folder) if f.endswith(".tmp")]
    reference = Checkpoint(small_checkpoint).load_state()
    state = Checkpoint(folder).load_state()
    assert all(torch.equal(state[n], reference[n]) for n in reference)

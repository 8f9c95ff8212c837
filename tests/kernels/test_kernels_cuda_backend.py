"""Without the GPU packages: rose still imports, and `--backend cuda` says what is missing (CPU)."""

import builtins
import importlib.util
import sys

import pytest

HIDDEN = ("cutlass", "flashinfer", "triton")


@pytest.fixture
def without_gpu_packages(monkeypatch):
    """Make nvidia-cutlass-dsl, flashinfer and triton unimportable, whatever this host has."""
    real_find_spec, real_import = importlib.util.find_spec, builtins.__import__

    def find_spec(name, *args, **kwargs):
        return None if name.split(".")[0] in HIDDEN else real_find_spec(name, *args, **kwargs)

    def import_(name, *args, **kwargs):
        if name.split(".")[0] in HIDDEN:
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    monkeypatch.setattr(builtins, "__import__", import_)
    for name in list(sys.modules):
        if name.split(".")[0] in HIDDEN:
            monkeypatch.delitem(sys.modules, name)


def test_kernel_modules_import_without_gpu_packages(without_gpu_packages):
    for name in ("kernels.rmsnorm", "kernels.swiglu", "kernels.router", "kernels.moe_dispatch",
                 "kernels.embedding", "kernels.attention", "services.worker.model.cuda_backend",
                 "services.worker.model.cuda_moe"):
        sys.modules.pop(name, None)
        importlib.import_module(name)


def test_backend_cuda_names_what_is_missing(without_gpu_packages, tiny_checkpoint):
    from services.worker.model import load_model

    with pytest.raises(RuntimeError) as err:
        load_model(tiny_checkpoint, backend="cuda")
    message = str(err.value)
    assert "nvidia-cutlass-dsl" in message and "flashinfer-python" in message and "triton" in message
    assert "pip install -e .[gpu]" in message


def test_engine_with_backend_cuda_fails_clearly(without_gpu_packages, tiny_checkpoint):
    from services.worker.engine.engine import Engine
    from shared.config import Settings

    with pytest.raises(RuntimeError, match="backend 'cuda' needs nvidia-cutlass-dsl"):
        Engine.from_settings(Settings(model=tiny_checkpoint, backend="cuda"))


def test_kernel_call_without_cutedsl_raises_import_error(without_gpu_packages):
    import torch

    from kernels import _cute
    from kernels.rmsnorm import rmsnorm

    _cute.cute_modules.cache_clear()
    with pytest.raises(ImportError, match="nvidia-cutlass-dsl"):
        rmsnorm(torch.randn(2, 64, dtype=torch.bfloat16), None, 1e-5)


def test_warm_up_scratch_steps_stay_on_the_scratch_blocks(tiny_checkpoint):
    """cuda_backend's warm-up steps (a prompt chunk, and a chunk after decode rows for the fa2 wrappers under
    ROSE_PREFILL_ATTENTION=auto) are steps a model takes, and touch no block but the scratch ones."""
    import torch

    from services.worker.model import load_model
    from services.worker.model.cuda_backend import _scratch_prefill

    model = load_model(tiny_checkpoint)
    c = model.config
    kv = model.make_kv_cache({"full": 4, "sliding": 4}, 16)
    kv.scratch_blocks = {"full": 3, "sliding": 3}  # the last block of each pool stands in for the scratch one
    batch = _scratch_prefill(40, kv, decode_rows=2)
    assert batch.query_lens == [1, 1, 38] and batch.context_lens == [1, 1, 38]
    assert batch.positions.tolist() == [0, 0] + list(range(38))
    assert all(t == [3] * len(t) for tables in batch.block_tables.values() for t in tables)
    assert [len(t) for t in batch.block_tables["full"]] == [1, 1, 3]
    logits = model(batch, kv)
    assert logits.shape == (3, c.vocab_size) and torch.isfinite(logits).all()
    assert all(not cache[:3].any() for cache in kv.k + kv.v)  # blocks 0-2 never written

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

"""Shared plumbing for the CuTeDSL kernels: lazy imports, tensor conversion, compile cache.

CuTeDSL (`nvidia-cutlass-dsl`) is an optional dependency: importing `kernels` must
work without it, so every kernel module imports it through `cute_modules()` at first
use, and `missing_gpu_packages()` names what is absent for a clear error.
"""

from __future__ import annotations

import functools
import importlib.util

import torch

# Every row kernel moves 16-byte vectors: 8 bf16 values per load/store.
VEC = 8


def missing_gpu_packages() -> list[str]:
    """Names of the pip packages the GPU path needs that are not importable here."""
    missing = []
    if importlib.util.find_spec("cutlass") is None:
        missing.append("nvidia-cutlass-dsl")
    if importlib.util.find_spec("cuda") is None or importlib.util.find_spec("cuda.bindings") is None:
        missing.append("cuda-python (cuda-bindings)")
    return missing


@functools.cache
def cute_modules():
    """(cutlass, cute, from_dlpack, cuda driver) imported once; ImportError names the package."""
    missing = missing_gpu_packages()
    if missing:
        raise ImportError(f"the CuTeDSL kernels need {', '.join(missing)}: pip install -e .[gpu]")
    import cuda.bindings.driver as cuda
    import cutlass
    import cutlass.cute as cute
    from cutlass.cute.runtime import from_dlpack

    return cutlass, cute, from_dlpack, cuda


def cute_dtype(dtype: torch.dtype):
    """The CuTeDSL numeric type of a torch dtype."""
    cutlass = cute_modules()[0]
    return {
        torch.bfloat16: cutlass.BFloat16,
        torch.float16: cutlass.Float16,
        torch.float32: cutlass.Float32,
        torch.int32: cutlass.Int32,
        torch.int64: cutlass.Int64,
    }[dtype]


def as_cute(t: torch.Tensor, align: int = 16):
    """A CuTeDSL view of a contiguous torch tensor (no copy), base assumed `align`-byte aligned."""
    from_dlpack = cute_modules()[2]
    return from_dlpack(t.detach(), assumed_align=align)


def fake_rows(dtype: torch.dtype, *inner: int, align: int = 16):
    """A compile-time stand-in for a contiguous [rows, *inner] tensor with rows dynamic."""
    cutlass, cute, _, _ = cute_modules()
    from cutlass.cute.runtime import make_fake_compact_tensor

    shape = (cute.sym_int(),) + tuple(inner)
    order = tuple(range(len(shape) - 1, -1, -1))  # row-major: last mode fastest
    return make_fake_compact_tensor(cute_dtype(dtype), shape, stride_order=order, assumed_align=align)


def fake_fixed(dtype: torch.dtype, *shape: int, align: int = 16):
    """A compile-time stand-in for a contiguous tensor of fully static shape."""
    cute_modules()
    from cutlass.cute.runtime import make_fake_compact_tensor

    order = tuple(range(len(shape) - 1, -1, -1))
    return make_fake_compact_tensor(cute_dtype(dtype), tuple(shape), stride_order=order, assumed_align=align)


def current_stream():
    """torch's current CUDA stream as a driver CUstream (so kernels join graphs and streams)."""
    cuda = cute_modules()[3]
    return cuda.CUstream(torch.cuda.current_stream().cuda_stream)


def fake_stream():
    """A compile-time stand-in for the CUstream argument (the real one is passed per call)."""
    cute_modules()
    from cutlass.cute.runtime import make_fake_stream

    return make_fake_stream()


def check_rows(x: torch.Tensor, width: int, name: str) -> None:
    """Kernels read rows as 16-byte vectors: contiguous, last dim a multiple of 8, aligned base."""
    if not x.is_contiguous():
        raise ValueError(f"{name} must be contiguous")
    if width % VEC:
        raise ValueError(f"{name}: last dim {width} is not a multiple of {VEC}")
    if x.data_ptr() % 16:
        raise ValueError(f"{name}: base address is not 16-byte aligned")

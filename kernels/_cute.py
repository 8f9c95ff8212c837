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
    """A CuTeDSL view of a contiguous torch tensor of static shape (no copy), `align`-byte aligned base."""
    from_dlpack = cute_modules()[2]
    return from_dlpack(t.detach(), assumed_align=align)


def as_rows(t: torch.Tensor, align: int = 16):
    """As `as_cute`, with the leading (row) dim dynamic: one compiled kernel serves every row count."""
    from_dlpack = cute_modules()[2]
    return from_dlpack(t.detach(), assumed_align=align).mark_compact_shape_dynamic(
        mode=0, stride_order=t.dim_order()
    )


_compiled: dict = {}


def compiled(key: tuple, jit_fn, *args):
    """`cute.compile(jit_fn, *args)` once per specialization key; later calls reuse it.

    The first call's arguments fix the argument types (static inner dims, dynamic rows),
    so every later call must pass views made the same way (`as_cute` / `as_rows`).
    """
    fn = _compiled.get(key)
    if fn is None:
        cute = cute_modules()[1]
        fn = _compiled[key] = cute.compile(jit_fn, *args)
    return fn


def current_stream():
    """torch's current CUDA stream as a driver CUstream (so kernels join graphs and streams)."""
    cuda = cute_modules()[3]
    return cuda.CUstream(torch.cuda.current_stream().cuda_stream)



def check_rows(x: torch.Tensor, width: int, name: str) -> None:
    """Kernels read rows as 16-byte vectors: contiguous, last dim a multiple of 8, aligned base."""
    if not x.is_contiguous():
        raise ValueError(f"{name} must be contiguous")
    if width % VEC:
        raise ValueError(f"{name}: last dim {width} is not a multiple of {VEC}")
    if x.data_ptr() % 16:
        raise ValueError(f"{name}: base address is not 16-byte aligned")

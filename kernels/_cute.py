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
        torch.uint8: cutlass.Uint8,
    }[dtype]


def rows(t: torch.Tensor, align: int = 16) -> tuple:
    """A launch argument whose leading (row) dim is dynamic: one compiled kernel for every row count."""
    return ("rows", t, align)


def fixed(t: torch.Tensor, align: int = 16) -> tuple:
    """A launch argument of static shape (weights, per-expert counts)."""
    return ("fixed", t, align)


def pdl_wait() -> None:
    """(Trace time, in a kernel) PDL's kernel side (kernels/pdl.py): wait for the kernel before, then let the next launch.

    Call it in every CTA, after loading only weights and before touching anything a kernel of
    the step writes. Emits nothing where PDL is off (launch with `use_pdl=pdl_enabled()`).
    """
    from kernels.pdl import pdl_enabled

    if pdl_enabled():
        cute = cute_modules()[1]
        cute.arch.griddepcontrol_wait()
        cute.arch.griddepcontrol_launch_dependents()


def tvm_ffi_available() -> bool:
    return importlib.util.find_spec("tvm_ffi") is not None


_compiled: dict = {}


def launch(key: tuple, jit_fn, *args) -> None:
    """Run `jit_fn(*args, stream)` on torch's current stream, compiling it once per key.

    args: `rows(t)` / `fixed(t)` tensors (contiguous, base `align`-byte aligned) and
    scalars. With apache-tvm-ffi present the kernel is compiled from shape-only fake
    tensors and called with the torch tensors themselves (a few microseconds a call);
    without it, through DLPack views (about 150 us of host time a call, measured).
    """
    fn = _compiled.get(key)
    tvm = tvm_ffi_available()
    if fn is None:
        cute = cute_modules()[1]
        if tvm:
            from cutlass.cute.runtime import make_fake_stream

            fakes = [_fake(a) if isinstance(a, tuple) else a for a in args]
            fn = cute.compile(jit_fn, *fakes, make_fake_stream(use_tvm_ffi_env_stream=True),
                              options="--enable-tvm-ffi")
        else:
            fn = cute.compile(jit_fn, *[_view(a) for a in args], current_stream())
        _compiled[key] = fn
    if tvm:
        fn(*[a[1] if isinstance(a, tuple) else a for a in args])
    else:
        fn(*[_view(a) for a in args], current_stream())


def _fake(arg: tuple):
    from cutlass.cute.runtime import make_fake_compact_tensor

    kind, t, align = arg
    cute = cute_modules()[1]
    shape = tuple(t.shape)
    if kind == "rows":
        shape = (cute.sym_int(),) + shape[1:]
    order = tuple(range(t.dim() - 1, -1, -1))  # row-major: last mode fastest
    return make_fake_compact_tensor(cute_dtype(t.dtype), shape, stride_order=order, assumed_align=align)


def _view(arg):
    if not isinstance(arg, tuple):
        return arg
    kind, t, align = arg
    from_dlpack = cute_modules()[2]
    view = from_dlpack(t.detach(), assumed_align=align)
    return view.mark_compact_shape_dynamic(mode=0, stride_order=t.dim_order()) if kind == "rows" else view


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

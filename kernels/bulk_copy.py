"""Hopper's bulk copies (cp.async.bulk) for CuTeDSL kernels, as trace-time helpers.

A bulk copy moves a contiguous run of bytes (a multiple of 16, both ends 16-byte aligned) between
global and shared memory on the SM's copy engine: one instruction from one thread however long the
run, so a kernel that only moves rows spends no threads on the bytes.
  load(dst_smem, src_gmem, size, mbar)  global -> shared; the bytes complete on an mbarrier (the
                                        issuer arms it with mbarrier_arrive_and_expect_tx)
  store(dst_gmem, src_smem, size)       shared -> global, in the thread's open bulk group
  store_commit_wait_read()              close the group and wait until its stores have read
                                        shared memory (the buffer may then be reused or freed;
                                        the global writes complete on their own)
  proxy_fence()                         order the thread's view of shared memory before its next
                                        bulk copy's (the copy engine reads through the async proxy)
"""

import functools
import types

from kernels._cute import cute_modules


@functools.cache
def bulk_ops() -> types.SimpleNamespace:
    """The helpers above, built once (they import CuTeDSL, an optional dependency)."""
    cute_modules()  # a clear ImportError where CuTeDSL is missing
    from cutlass import Int32
    from cutlass._mlir.dialects import llvm
    from cutlass.cutlass_dsl import dsl_user_op

    def emit(args, text, constraints, loc, ip):
        llvm.inline_asm(None, [a.ir_value(loc=loc, ip=ip) for a in args], text, constraints,
                        has_side_effects=True, is_align_stack=False, asm_dialect=llvm.AsmDialect.AD_ATT)

    @dsl_user_op
    def load(dst, src, size, mbar, *, loc=None, ip=None):
        emit([dst.toint(loc=loc, ip=ip), src.toint(loc=loc, ip=ip), Int32(size), mbar.toint(loc=loc, ip=ip)],
             "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [$0], [$1], $2, [$3];", "r,l,r,r",
             loc, ip)

    @dsl_user_op
    def store(dst, src, size, *, loc=None, ip=None):
        emit([dst.toint(loc=loc, ip=ip), src.toint(loc=loc, ip=ip), Int32(size)],
             "cp.async.bulk.global.shared::cta.bulk_group [$0], [$1], $2;", "l,r,r", loc, ip)

    @dsl_user_op
    def store_commit_wait_read(*, loc=None, ip=None):
        emit([], "cp.async.bulk.commit_group; cp.async.bulk.wait_group.read 0;", "", loc, ip)

    @dsl_user_op
    def proxy_fence(*, loc=None, ip=None):
        emit([], "fence.proxy.async.shared::cta;", "", loc, ip)

    return types.SimpleNamespace(load=load, store=store, store_commit_wait_read=store_commit_wait_read,
                                 proxy_fence=proxy_fence)

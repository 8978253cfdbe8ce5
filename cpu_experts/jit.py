"""The one place that sets how cpu_experts kernels are compiled (numbagg-style policy module).

- nogil=True: kernels run on threads we manage (cpu_experts/pool.py), so they must release the GIL.
  We do not use Numba's parallel=True: its default "workqueue" layer is not safe from a non-main
  thread (CpuMoE runs kernels from a background worker), and a pool of our own lets each thread take
  one contiguous range of rows, which docs/kernels.md records as 10-15 % faster than round-robin chunks.
- cache=True: compiled code is kept in __pycache__, so users and CI pay compile time once.
- fastmath: only 'reassoc' (lets LLVM vectorize float reductions), 'contract' (FMA) and 'nsz'.
  Not 'nnan'/'ninf': a NaN in a weight or activation must stay visible in the output.
- boundscheck off (the default): callers validate shapes once, in Python, before calling.
"""
from __future__ import annotations

import hashlib

import numba
from llvmlite import ir
from numba import types
from numba.core.extending import intrinsic

FASTMATH = frozenset({"reassoc", "contract", "nsz"})


def _ir_salt() -> str:
    from cpu_experts.ir import KERNELS, VERSION
    text = "".join(KERNELS[k] for k in sorted(KERNELS)) + repr(_FROZEN_GLOBALS())
    return f"ir-v{VERSION}-" + hashlib.sha256(text.encode()).hexdigest()[:16]


def _FROZEN_GLOBALS():
    # Numba freezes module globals into the machine code and its cache key ignores their values.
    return (ROW_BLOCK, COL_BLOCK)


def kernel(fn):
    """Decorator for every cpu_experts kernel.

    Numba's cache key covers a function's own bytecode, not the LLVM IR text our intrinsics link in
    (cpu_experts/ir.py) nor the values of the globals it freezes (ROW_BLOCK, COL_BLOCK), so an edit
    there would silently run stale cached machine code. We add a hash of both to each function's
    cache key (through Numba's FunctionCache._index_key).
    """
    disp = numba.njit(nogil=True, cache=True, fastmath=set(FASTMATH), error_model="numpy")(fn)
    cache = getattr(disp, "_cache", None)
    if cache is not None and hasattr(cache, "_index_key"):
        base, salt = cache._index_key, _ir_salt()
        cache._index_key = lambda sig, codegen: (base(sig, codegen), salt)
    return disp


@intrinsic
def bits_to_f32(typingctx, bits):
    """Reinterpret the low 32 bits of an integer as a float32 (bf16 -> f32 is bits_to_f32(b << 16))."""
    if not isinstance(bits, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        v = builder.trunc(args[0], ir.IntType(32)) if bits.bitwidth > 32 else builder.zext(args[0], ir.IntType(32)) \
            if bits.bitwidth < 32 else args[0]
        return builder.bitcast(v, ir.FloatType())
    return types.float32(bits), codegen


@intrinsic
def f32_to_bits(typingctx, x):
    """The bit pattern of a float32 as a uint32."""
    if x != types.float32:
        return None

    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.IntType(32))
    return types.uint32(x), codegen


@intrinsic
def half_bits_to_f32(typingctx, bits):
    """IEEE half bit pattern (low 16 bits of an integer) -> float32, exact (vcvtph2ps with F16C)."""
    if not isinstance(bits, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        v = builder.trunc(args[0], ir.IntType(16)) if bits.bitwidth > 16 else args[0]
        return builder.fpext(builder.bitcast(v, ir.HalfType()), ir.FloatType())
    return types.float32(bits), codegen


@intrinsic
def prefetch(typingctx, arr, idx):
    """Software prefetch (read, keep in all cache levels) of &arr[idx]; never faults, even past the end.

    docs/kernels.md: prefetching 8-16 KiB ahead was the largest single step towards the bandwidth limit.
    """
    if not isinstance(arr, types.Array) or not isinstance(idx, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        from numba.core import cgutils
        ary = context.make_array(sig.args[0])(context, builder, args[0])
        ptr = builder.gep(ary.data, [args[1]])
        i8p = ir.IntType(8).as_pointer()
        i32 = ir.IntType(32)
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]),
                                            "llvm.prefetch.p0")
        builder.call(fn, [builder.bitcast(ptr, i8p), i32(0), i32(3), i32(1)])
        return context.get_dummy_value()
    return types.void(arr, idx), codegen

# Software prefetch distance of the AVX-512 row kernels, in bytes ahead of each weight stream, per
# format. docs/kernels.md: 8-16 KiB ahead beat 256 B-2 KiB by 10-15 %. Measured here (2 threads, K2
# shape): int4 best at 4 KiB (60.6 vs 58.1 GB/s at 8 KiB), fp8 at 16 KiB (40.5 vs 39.3; 31 at 4 KiB),
# bf16 flat from 4 to 32 KiB.
PREFETCH_BYTES = {"int4": 4096, "fp8": 16384, "bf16": 8192}
# Rows per block in the fast drivers: a block of gate+up rows (64 x 3.5 KiB x 2 for K2 INT4) stays in
# L2 while every token of the group uses it.
ROW_BLOCK = 64
# Columns per block in the float-activation prefill kernels: 4 tokens x 2 rows x 1024 f32 = 32 KiB of
# activations, which stay in L1 while a block of weight rows streams from L2 (without it the loads
# of activations from L2 bound fp8/bf16 prefill at ~1 FMA per cycle).
COL_BLOCK = 1024

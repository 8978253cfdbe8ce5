"""RowPool's hand-off: nogil Numba functions over a shared int64 flag array and POSIX semaphores.

Why: a hand-off through Python locks or a ThreadPoolExecutor takes the GIL on both sides of every
wake-up; measured here 18-19 us per pool.run of a no-op kernel on 2 threads, both ways, and the dense layers
add ~7 calls per MoE layer. Here each side waits with the GIL released (a semaphore wait inside nogil
Numba code), and publishes its flag from nogil code, so the other side does not find the GIL taken when it
returns to Python (a GIL hand-off is another futex wake-up). Optionally each side first spins `spins`
pauses on the flag before it sleeps (RowPool's spin_us; see there why the default is not to); a worker
that spun and saw a call waits `start_delay` pauses before it takes the GIL, the time the caller needs to
dispatch its own part (~1.5 us).

Flags, 128 bytes apart: KICK = the latest call, generation << 8 | number of workers with rows in it (one
atomic value: a worker never mixes two calls); MAIN_WAIT = the caller sleeps on its semaphore; then per
worker w: DONE = the last call it finished, ASLEEP = it sleeps on its semaphore. Every flag store is followed by a load of the other side's flag, both sequentially consistent,
so a sleeper is never missed (Dekker's rule); a spare semaphore post only costs one more look at the flags.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import time

import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.core.extending import intrinsic

from cpu_experts.jit import kernel

SLOT = 16                      # int64s between two flags: 128 bytes
KICK, MAIN_WAIT = 0, SLOT
SEM_BYTES = 64                 # one glibc sem_t (32 bytes) per cache line
_LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def done_slot(worker: int) -> int:
    return SLOT * (2 + 2 * worker)


def asleep_slot(worker: int) -> int:
    return SLOT * (3 + 2 * worker)


def new_flags(workers: int) -> np.ndarray:
    return np.zeros(SLOT * (2 + 2 * workers), np.int64)


def new_semaphores(count: int) -> np.ndarray:
    """`count` process-private POSIX semaphores at 0, in one uint8 buffer (semaphore k at byte SEM_BYTES * k).
    The buffer must outlive every thread that waits on them."""
    buf = np.zeros(SEM_BYTES * count + 64, np.uint8)
    base = -buf.ctypes.data % 64
    buf = buf[base: base + SEM_BYTES * count]
    for k in range(count):
        if _LIBC.sem_init(ctypes.c_void_p(buf.ctypes.data + SEM_BYTES * k), 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "sem_init failed")
    return buf


def _ptr(context, builder, arr_ty, arr, idx):
    ary = context.make_array(arr_ty)(context, builder, arr)
    return builder.gep(ary.data, [idx])


@intrinsic
def load_seq(typingctx, arr, idx):
    """arr[idx] read sequentially consistent (never hoisted out of a loop, ordered after earlier stores)."""
    if not isinstance(arr, types.Array) or arr.dtype != types.int64:
        return None

    def codegen(context, builder, sig, args):
        return builder.load_atomic(_ptr(context, builder, sig.args[0], *args), "seq_cst", 8)
    return types.int64(arr, idx), codegen


@intrinsic
def store_seq(typingctx, arr, idx, val):
    """arr[idx] = val, sequentially consistent."""
    if not isinstance(arr, types.Array) or arr.dtype != types.int64:
        return None

    def codegen(context, builder, sig, args):
        v = context.cast(builder, args[2], sig.args[2], types.int64)
        builder.store_atomic(v, _ptr(context, builder, sig.args[0], args[0], args[1]), "seq_cst", 8)
        return context.get_dummy_value()
    return types.void(arr, idx, val), codegen


@intrinsic
def cpu_relax(typingctx):
    """x86 `pause`: the spin-wait hint (the LLVM intrinsic; inline asm does not survive Numba's cache)."""
    def codegen(context, builder, sig, args):
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), []), "llvm.x86.sse2.pause")
        builder.call(fn, [])
        return context.get_dummy_value()
    return types.void(), codegen




def _sem_call(name: str):
    """An intrinsic calling libc's `name`(sem_t *) on semaphore k of a new_semaphores() buffer."""
    @intrinsic
    def call(typingctx, sems, k):
        if not isinstance(sems, types.Array):
            return None

        def codegen(context, builder, sig, args):
            off = builder.mul(context.cast(builder, args[1], sig.args[1], types.int64),
                              ir.Constant(ir.IntType(64), SEM_BYTES))
            p = _ptr(context, builder, sig.args[0], args[0], off)
            fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.IntType(32), [p.type]), name)
            return builder.call(fn, [p])
        return types.int32(sems, k), codegen
    return call


sem_post, sem_wait, sem_trywait = _sem_call("sem_post"), _sem_call("sem_wait"), _sem_call("sem_trywait")


@kernel
def relax_loop(n):
    """n pause instructions (for pauses_per_us())."""
    for _ in range(n):
        cpu_relax()


@kernel
def kick(flags, value, sems):
    """Caller: announce call `value` (generation << 8 | active workers); wake the active workers that
    sleep (semaphore 1 + w is worker w's)."""
    store_seq(flags, KICK, value)
    for w in range(value & 255):
        if load_seq(flags, SLOT * (3 + 2 * w)) != 0:
            store_seq(flags, SLOT * (3 + 2 * w), 0)
            sem_post(sems, 1 + w)


@kernel
def _all_done(flags, value):
    for w in range(value & 255):
        if load_seq(flags, SLOT * (2 + 2 * w)) != value:
            return False
    return True


@kernel
def await_done(flags, value, spins, sems):
    """Caller: return once every active worker of call `value` published it: spin `spins` pauses, then
    sleep on semaphore 0."""
    i = 0
    while not _all_done(flags, value):
        if i < spins:
            cpu_relax()
            i += 1
            continue
        store_seq(flags, MAIN_WAIT, 1)
        if not _all_done(flags, value):
            sem_wait(sems, 0)
        store_seq(flags, MAIN_WAIT, 0)
    while sem_trywait(sems, 0) == 0:          # spare posts from workers that saw MAIN_WAIT late
        pass


@kernel
def worker_wait(flags, seen, w, spins, start_delay, sems):
    """Worker w: publish that call `seen` is done (waking a sleeping caller), then wait for the next call
    that gives it work: spin `spins` pauses, then sleep on semaphore 1 + w. Returns that call's value after
    `start_delay` pauses (the caller is dispatching its own part meanwhile and holds the GIL)."""
    store_seq(flags, SLOT * (2 + 2 * w), seen)
    if load_seq(flags, MAIN_WAIT) != 0:
        sem_post(sems, 0)
    i = 0
    while True:
        g = load_seq(flags, KICK)
        if g != seen:
            if w < (g & 255):
                break
            seen = g                          # a call with no rows for this worker
        if i < spins:
            cpu_relax()
            i += 1
        else:
            store_seq(flags, SLOT * (3 + 2 * w), 1)
            if load_seq(flags, KICK) == seen:
                sem_wait(sems, 1 + w)
            store_seq(flags, SLOT * (3 + 2 * w), 0)
    for _ in range(start_delay):
        cpu_relax()
    return g


_PAUSES_PER_US: list[float] = []


def pauses_per_us() -> float:
    """How many `pause` instructions take one microsecond on this CPU (10-140 cycles each, by model);
    measured once per process (~2 ms)."""
    if not _PAUSES_PER_US:
        relax_loop(1000)
        best = float("inf")
        for _ in range(5):
            t = time.perf_counter()
            relax_loop(20000)
            best = min(best, time.perf_counter() - t)
        _PAUSES_PER_US.append(20000 / max(best * 1e6, 1e-3))
    return _PAUSES_PER_US[0]

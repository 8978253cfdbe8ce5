"""Measurements of this machine's CPU side, shared by bench/kernels.py and `hybrid plan --calibrate`. Torch-free.

- read_bandwidth: GB/s of a Numba read loop over a buffer (plain and with software prefetch: the ceiling the
  kernels are held against, docs/kernels.md);
- random_store / random_packed: a pool of experts, a dense weight, with random codes and sane scales, built
  without quantizing;
- decode_bw: the CPU MoE's effective bandwidth on one-token calls with random distinct experts;
- prefill: one call with T tokens vs the same routing as T one-token calls.
Best-of-rounds everywhere: the host is shared, and other tenants only ever slow a round down.
"""
from __future__ import annotations

import time

import numpy as np

from quant.formats import f32_to_bf16_bits
from quant.layout import make_layout
from quant.packed import PackedMatrix
from quant.store import LayerStore, StoreSpec

from .ir import read_chunks, read_chunks_prefetch
from .jit import kernel
from .pool import RowPool

H, I, TOPK = 7168, 2048, 8      # Kimi K2's routed expert, top-8 per token
GIB = 1 << 30


@kernel
def _read(a, pfd, r0, r1, out):
    """Sum 64-byte chunks [r0, r1) of uint8 `a` with 64-byte vector loads, prefetching pfd bytes ahead."""
    if r1 > r0:
        if pfd > 0:
            read_chunks_prefetch(a, r0 * 64, r1 - r0, pfd, out, r0)
        else:
            read_chunks(a, r0 * 64, r1 - r0, 0, out, r0)


def read_bandwidth(buf: np.ndarray, threads: int, numpy_sum: bool = True) -> dict:
    """GB/s of reading `buf` once: numpy sum (1 thread), and the read loop with `threads` threads."""
    a = np.asarray(buf)[: buf.size // 64 * 64]
    out = np.zeros(a.size // 64, np.int32)
    pool = RowPool(threads)
    res = {}
    if numpy_sum:
        t = time.perf_counter()
        a.view(np.int64).sum()
        res["numpy sum, 1 thread"] = a.size / (time.perf_counter() - t) / 1e9
    for name, pfd in (("read loop", 0), ("read loop + prefetch 8 KiB", 8192), ("read loop + prefetch 16 KiB", 16384)):
        best = 0.0
        for _ in range(3):
            t = time.perf_counter()
            pool.run(_read, (a, np.int64(pfd), out), a.size // 64)
            best = max(best, a.size / (time.perf_counter() - t) / 1e9)
        res[f"{name}, {threads} thr"] = best
    pool.close()
    return res


def random_codes(fmt: str, nbytes: int, rng) -> np.ndarray:
    """nbytes random weight bytes of `fmt` (uint8), written 64 MiB at a time (writing touches every page):
    fp8 without the NaN codes, bf16 with a sign, 7 random mantissa bits and an exponent near 2^-7.

    Every page gets its own random bytes, so no page sharing or compression can flatter a kernel.
    """
    buf = np.empty(nbytes, np.uint8)
    step = 64 << 20
    for o in range(0, buf.size, step):
        n = min(step, buf.size - o)
        chunk = np.frombuffer(rng.bytes(n), np.uint8)
        if fmt == "fp8":
            chunk = chunk & np.uint8(0xF7)             # never 0x7F / 0xFF (NaN)
        elif fmt == "bf16":
            chunk = ((chunk.view(np.uint16) & np.uint16(0x807F)) | np.uint16(0x3C00)).view(np.uint8)
        buf[o:o + n] = chunk
    return buf


def _sane_scale(fmt: str):
    return f32_to_bf16_bits(np.float32(0.01)) if fmt == "int4" else np.float32(1e-3)


def random_store(fmt: str, n_experts: int, rng, hidden: int = H, inter: int = I) -> LayerStore:
    """A pool of experts (K2-shaped by default) with random codes and sane scales, built without quantizing."""
    lay = make_layout(fmt, hidden, inter)
    store = LayerStore(StoreSpec(fmt, hidden, inter), n_experts, random_codes(fmt, n_experts * lay.stride, rng),
                       source="bench")
    for e in range(n_experts):
        for m in ("gate", "up", "down"):
            if m + "_scale" in lay.sections:
                store.section(e, m + "_scale")[...] = _sane_scale(fmt)
    return store


def random_packed(fmt: str, groups: int, rows: int, cols: int, rng) -> PackedMatrix:
    """A dense weight [groups, rows, cols] with random codes and sane scales, built without quantizing."""
    m = PackedMatrix.empty(fmt, groups, rows, cols)
    m.buffer[...] = random_codes(fmt, m.buffer.size, rng)
    for g in range(groups):
        if m.scales(g) is not None:
            m.scales(g)[...] = _sane_scale(fmt)
    return m


def decode_bw(moe, store, calls: int, rng, rounds: int = 3) -> tuple[float, float]:
    """(best GB/s, its ms per call) over `rounds` rounds of `calls` one-token calls with random experts.

    Best-of-rounds because the host is shared: other tenants' load only ever slows a round down.
    """
    x = rng.standard_normal((1, H), dtype=np.float32)
    w = np.full((1, TOPK), 1.0 / TOPK, np.float32)
    moe(0, x, rng.choice(store.n_experts, TOPK, replace=False)[None], w)
    best = None
    for _ in range(rounds):
        ids = [rng.choice(store.n_experts, TOPK, replace=False)[None] for _ in range(calls)]
        t = time.perf_counter()
        for i in ids:
            moe(0, x, i, w)
        dt = (time.perf_counter() - t) / calls
        best = dt if best is None else min(best, dt)
    return TOPK * store.expert_nbytes() / best / 1e9, best


def prefill(moe, store, rng, T=256, pool=64, rounds: int = 2) -> dict:
    """One call with T tokens routed top-8 over `pool` experts vs the same routing as T decode calls."""
    n = min(pool, store.n_experts)
    x = rng.standard_normal((T, H), dtype=np.float32) * 0.1
    ids = np.stack([rng.choice(n, TOPK, replace=False) for _ in range(T)])
    w = rng.random((T, TOPK)).astype(np.float32)
    moe(0, x[:8], ids[:8], w[:8])
    dt_pre = dt_dec = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        moe(0, x, ids, w)
        dt_pre = min(dt_pre, time.perf_counter() - t)
        t = time.perf_counter()
        for i in range(T):
            moe(0, x[i:i + 1], ids[i:i + 1], w[i:i + 1])
        dt_dec = min(dt_dec, time.perf_counter() - t)
    flop = 2.0 * 3 * H * I * T * TOPK
    return {"prefill tok/s": T / dt_pre, "prefill GFLOP/s": flop / dt_pre / 1e9,
            "decode-path tok/s": T / dt_dec, "speedup": dt_dec / dt_pre}

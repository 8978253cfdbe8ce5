"""Running chosen experts of one LayerStore through the kernels, on a RowPool: the part of the MoE forward
that CpuMoE (routed experts) and PackedMLP (one dense SwiGLU MLP as a one-expert store) share.

T = tokens, P = (token, expert) pairs grouped by expert (group k = pairs grp_ptr[k]:grp_ptr[k+1], expert
grp_e[k]), H = hidden, I = inter. Every function adds sum over its pairs of w[p] * Expert(x[tok[p]]) into
out [T, H] float32; x [T, H] float32 C-contiguous. Which kernels run is the layer's path
(cpu_experts/paths.py):
  - run_fast ("int4-int8" / "avx512" / "avx2"): the IR kernels (of paths.active_isa()), for decode and prefill alike: a block of ROW_BLOCK
    weight rows is decoded in registers for up to 4 tokens at a time and serves every token of its
    expert's group while it sits in L2, so a call reads each chosen expert's weights once;
  - run_rows ("plain"): per-pair Numba kernels, for experts chosen by few tokens;
  - run_tile ("plain", an expert chosen by many tokens): the pool dequantizes a tile of rows to float32 once
    and one float32 GEMM (numpy's BLAS) applies it to all those tokens.
"""
from __future__ import annotations

import numpy as np

from quant.store import LayerStore

from cpu_experts import int4_vnni, ir
from cpu_experts.jit import PREFETCH_BYTES
from cpu_experts.paths import KERNELS, isa_index
from cpu_experts.pool import RowPool

TILE_ROWS = 256          # rows per dequantized tile: 256 x 7168 f32 = 7.3 MB, stays in the 32 MB L3


def int8_buffers(rows: int, n: int):
    """Buffers prepare_int8 fills for `rows` activation rows of n inputs: codes, scales, corrections."""
    return (np.empty((rows, n), np.int8), np.empty((rows, n // 128), np.float32),
            np.empty((rows, n // 8), np.int32))


class ExpertLayer:
    """A store plus the typed views of its buffer that the kernels take (`head`), and its path."""

    def __init__(self, store: LayerStore, path: str = "plain"):
        s = store.spec
        self.store, self.path = store, path
        self.mod = KERNELS[s.fmt].plain
        self.fast = KERNELS[s.fmt].fast if path != "plain" else None
        self.isa = np.int64(isa_index(path)) if path != "plain" else None    # the fast drivers' ISA argument
        self.order = ir.fp8_order(s.hidden) if s.fmt == "fp8" and path in ir.ISAS else None
        buf = np.asarray(store.buffer)            # drop the np.memmap subclass (no copy)
        self.buf8, self.buf16, self.buf32 = buf, buf.view(np.uint16), buf.view(np.float32)
        names = ("gate", "up", "down", "gate_scale", "up_scale", "down_scale")
        secs = store.layout.sections
        self.lay = np.array([secs[n].offset if n in secs else 0 for n in names], dtype=np.int64)
        self.head = (self.buf8, self.buf16, self.buf32, np.int64(store.stride), self.lay,
                     np.int64(s.hidden), np.int64(s.inter), np.int64(s.group_size))


def run_fast(pool: RowPool, L: ExpertLayer, grp_e, grp_ptr, tok, w, x, out, parts: int | None = None) -> None:
    """IR kernels: activations gathered in pair order; each weight row block serves its whole group.
    parts: at most this many of the pool's threads (RowPool.run)."""
    H, I = L.store.spec.hidden, L.store.spec.inter
    act = np.empty((tok.size, I), dtype=np.float32)
    pfd = np.int64(PREFETCH_BYTES[L.store.spec.fmt])
    if L.path in ir.ISAS:
        if L.order is not None:                   # the fp8 kernel reads activations in its own order
            x = x[:, L.order]
        pool.run(L.fast.gateup, (*L.head, grp_e, grp_ptr, x[tok], L.isa, pfd, act), I, align=128, parts=parts)
        pool.run(L.fast.down, (*L.head, grp_e, grp_ptr, tok, w, act, L.isa, pfd, out), H, align=128, parts=parts)
        return
    xq, xs, xc = int8_buffers(x.shape[0], H)              # quantize each token once, then gather
    int4_vnni.prepare_int8(x, xq, xs, xc)
    xq, xs, xc = xq[tok], xs[tok], xc[tok]
    pool.run(int4_vnni.gateup, (*L.head, grp_e, grp_ptr, xq, xs, xc, L.isa, pfd, act), I, align=128, parts=parts)
    aq, as_, ac = int8_buffers(tok.size, I)
    int4_vnni.prepare_int8(act, aq, as_, ac)
    pool.run(int4_vnni.down, (*L.head, grp_e, grp_ptr, tok, w, aq, as_, ac, L.isa, pfd, out), H, align=128, parts=parts)


def run_rows(pool: RowPool, L: ExpertLayer, grp_e, grp_ptr, tok, w, x, out, parts: int | None = None) -> None:
    """Plain Numba kernels: tokens read through `tok`, one pass over the weights per pair."""
    H, I = L.store.spec.hidden, L.store.spec.inter
    act = np.empty((tok.size, I), dtype=np.float32)
    pool.run(L.mod.gateup, (*L.head, grp_e, grp_ptr, tok, x, act), I, parts=parts)
    pool.run(L.mod.down, (*L.head, grp_e, grp_ptr, tok, w, act, out), H, parts=parts)


def run_tile(pool: RowPool, L: ExpertLayer, e: int, x, tok, w, out) -> None:
    """Plain path for an expert chosen by many tokens: dequantized tiles of rows, then BLAS."""
    H, I = L.store.spec.hidden, L.store.spec.inter
    X = x[tok]
    unique = np.unique(tok).size == tok.size
    act = np.empty((tok.size, I), dtype=np.float32)
    tg = np.empty((TILE_ROWS, H), dtype=np.float32)
    tu = np.empty((TILE_ROWS, H), dtype=np.float32)
    for r0 in range(0, I, TILE_ROWS):
        n = min(TILE_ROWS, I - r0)
        pool.run(L.mod.dequant_rows, (*L.head, e, 0, r0, tg), n, start=r0)
        pool.run(L.mod.dequant_rows, (*L.head, e, 1, r0, tu), n, start=r0)
        g = X @ tg[:n].T
        with np.errstate(over="ignore"):
            act[:, r0:r0 + n] = g / (np.float32(1.0) + np.exp(-g)) * (X @ tu[:n].T)
    rows_d = TILE_ROWS * max(1, H // I)
    td = np.empty((rows_d, I), dtype=np.float32)
    for h0 in range(0, H, rows_d):
        n = min(rows_d, H - h0)
        pool.run(L.mod.dequant_rows, (*L.head, e, 2, h0, td), n, start=h0)
        y = w[:, None] * (act @ td[:n].T)
        if unique:
            out[tok, h0:h0 + n] += y
        else:                                   # a token listed the same expert twice
            np.add.at(out, (tok[:, None], np.arange(h0, h0 + n)[None, :]), y)


def warm_up(pool: RowPool, L: ExpertLayer) -> None:
    """Compile (or load from Numba's cache) every kernel of L's path for its buffer types, now."""
    H, I = L.store.spec.hidden, L.store.spec.inter
    if L.fast is not None:                   # one real call compiles every token-block size
        run_fast(pool, L, np.zeros(1, np.int64), np.array([0, 7], np.int64), np.zeros(7, np.int64),
                 np.zeros(7, np.float32), np.zeros((1, H), np.float32), np.zeros((1, H), np.float32))
        return
    z = np.zeros(0, dtype=np.int64)
    ptr = np.zeros(1, dtype=np.int64)
    L.mod.gateup(*L.head, z, ptr, z, np.zeros((1, H), np.float32), 0, 0, np.zeros((0, I), np.float32))
    L.mod.down(*L.head, z, ptr, z, np.zeros(0, np.float32), np.zeros((0, I), np.float32), 0, 0,
               np.zeros((1, H), np.float32))
    L.mod.dequant_rows(*L.head, 0, 0, 0, 0, 0, np.zeros((1, H), np.float32))

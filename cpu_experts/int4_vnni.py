"""INT4 expert kernels, fast path: int8 activations x int4 weights with vpdpbusd (cpu_experts/ir.py).

P = (token, expert) pairs, grouped by expert (group k = pairs grp_ptr[k]:grp_ptr[k+1]). Unlike the
plain kernels, activations are in pair order (row p = the token of pair p) and prepared by
prepare_int8: per 128 inputs (one 64-byte weight chunk) a float scale s = max|x| / 127, int8 codes
rint(x / s) reordered to match the packed nibbles, and the per-lane correction -8 * sum(codes).
Quantizing the activations changes outputs by about 1e-2 of max|y| (llama.cpp's Q4_0 x Q8_0 does the
same); cpu_experts/int4.py is the exact float-activation path. The drivers take `isa`, an index into
ir.ISAS: the AVX-512 (vpdpbusd) or AVX2 (vpmaddubsw + vpmaddwd) kernels, same data layout; the caller
checks ir.supported(isa).

Each thread takes rows [r0, r1) of every expert; rows go in blocks of ROW_BLOCK, and every token of
the group uses a block while it is in L2 (in registers, 4 tokens at a time): prefill reads each
weight once per call, decode (1 token per expert) is the same loop with a token block of 1.
"""
from __future__ import annotations

import numpy as np

from cpu_experts import ir
from cpu_experts.jit import ROW_BLOCK, kernel, prefetch


@kernel
def prepare_int8(x, xq, xs, corr):
    """x f32 [T, n] (n % 128 == 0) -> xq int8 [T, n], xs f32 [T, n/128], corr int32 [T, n/8].

    Chunk c of row t: xq[t, 128c + 16b + j] = code of x[t, 128c + 32b + j] (low nibbles' partners),
    xq[t, 128c + 64 + 16b + j] = code of x[t, 128c + 32b + 16 + j] (high nibbles'), b < 4, j < 16.
    """
    T, n = x.shape
    for t in range(T):
        for c in range(n // 128):
            o = c * 128
            m = np.float32(0.0)
            for j in range(128):
                m = max(m, abs(x[t, o + j]))
            xs[t, c] = m / np.float32(127.0)
            inv = np.float32(127.0) / m if m > 0 else np.float32(0.0)
            for b in range(4):
                for j in range(16):
                    xq[t, o + 16 * b + j] = np.int8(np.rint(x[t, o + 32 * b + j] * inv))
                    xq[t, o + 64 + 16 * b + j] = np.int8(np.rint(x[t, o + 32 * b + 16 + j] * inv))
            for lane in range(16):
                s = np.int32(0)
                for i in range(4):
                    s += np.int32(xq[t, o + 4 * lane + i]) + np.int32(xq[t, o + 64 + 4 * lane + i])
                corr[t, c * 16 + lane] = -8 * s


@kernel
def _block(n_left):
    """Tokens the next kernel call takes: 4, 2 or 1 (ir.TOKENS)."""
    return 4 if n_left >= 4 else (2 if n_left >= 2 else 1)


@kernel
def row_pairs(nr, rowb, pfd):
    """How a block of nr rows of rowb bytes goes through the two-row kernels: (offset of row B from row A,
    step between pairs), in rows. Adjacent rows (1, 2) while the prefetch distance reaches past the pair;
    for longer rows, two sequential streams half a block apart (nr // 2, 1), since a prefetch short of the
    pair lands in its other row, read anyway. Measured single-thread, per CPU-second: int4 rows of 3584
    bytes (K = 7168) 29.3-30.0 GB/s split against 25.5-26.2 adjacent; 1024-byte rows (K2's expert down)
    29.6 adjacent against 27.5 split."""
    return (nr // 2, 1) if 2 * rowb > pfd else (1, 2)


@kernel
def prefetch_next(buf, grp_e, k, stride, off, n):
    """Software prefetch of bytes [off, off + n) of group k + 1 (if any), one per 64-byte line: a group's
    streams start cold otherwise. Grouped products of short runs per group gain most: [64, 128, 512] int4
    (MLA's W_UV per head) 13.9 -> 15.8 GB/s per CPU-second, [64, 512, 128] 11.6 -> 13.0."""
    if k + 1 < grp_e.shape[0]:
        start = grp_e[k + 1] * stride + off
        for o in range(start, start + n, 64):
            prefetch(buf, o)


@kernel
def token_index(nt):
    """Position of the token-block size nt in ir.TOKENS = (1, 2, 4): the float kernel tables' index."""
    return 2 if nt == 4 else (1 if nt == 2 else 0)


@kernel
def float_index(isa, nt):
    """Position of the kernel for instruction set isa (index into ir.ISAS) and token block nt in the float
    kernel tables (ir.FLOAT_TABLES)."""
    return isa * 3 + token_index(nt)


@kernel
def int4_index(isa, gs, nt):
    """Position of the kernel for instruction set isa (index into ir.ISAS), group size gs and token block nt
    in ir.INT4_TABLE."""
    return (isa * 3 + (0 if gs == 32 else (1 if gs == 64 else 2))) * 3 + token_index(nt)


@kernel
def _call(isa, gs, nt, w, owa, owb, osa, osb, sst, xq, oxq, xs, oxs, cr, ocr, tx, wst, nch, n, oa, ooa, ob, oob, ost,
          otst, pfd):
    """The IR kernel of ir.INT4_TABLE for this ISA, group size and token-block size; codes and scales from w."""
    ir.int4_vnni(int4_index(isa, gs, nt), w, owa, w, owb, w, osa, w, osb, sst, xq, oxq, xs, oxs, cr, ocr, tx, wst, nch,
                 n, oa, ooa, ob, oob, ost, otst, pfd, 0)


@kernel
def gateup(buf8, buf16, buf32, stride, lay, H, I, gs, grp_e, grp_ptr, xq, xs, corr, isa, pfd, r0, r1, act):
    """act[p, r] = silu(gate . x_p) * (up . x_p) for r in [r0, r1); x_p = prepared activations row p; isa: the
    kernels' instruction set, an index into ir.ISAS (the caller checks ir.supported for it).

    Gate row r and up row r go through the kernel together (two weight streams). One-stream passes
    (two gate rows at a time, then two up rows) measured slower: 38.4 vs 44.9 GB/s for K2 decode.
    """
    nch = H // 128
    rowb, srow = H // 2, (H // gs) * 2
    g = np.empty((4, ROW_BLOCK), np.float32)
    u = np.empty((4, ROW_BLOCK), np.float32)
    for k in range(grp_e.shape[0]):
        base = grp_e[k] * stride
        for rb in range(r0, r1, ROW_BLOCK):
            nr = min(ROW_BLOCK, r1 - rb)
            p = grp_ptr[k]
            while p < grp_ptr[k + 1]:
                nt = _block(grp_ptr[k + 1] - p)
                _call(isa, gs, nt, buf8, base + lay[0] + rb * rowb, base + lay[1] + rb * rowb,
                      base + lay[3] + rb * srow, base + lay[4] + rb * srow, srow,
                      xq, p * H, xs, p * nch, corr, p * nch * 16, H, rowb, nch, nr, g, 0, u, 0, 1, ROW_BLOCK, pfd)
                for t in range(nt):
                    for i in range(nr):
                        act[p + t, rb + i] = g[t, i] / (np.float32(1.0) + np.exp(-g[t, i])) * u[t, i]
                p += nt


@kernel
def down(buf8, buf16, buf32, stride, lay, H, I, gs, grp_e, grp_ptr, tok, wts, aq, as_, acorr, isa, pfd, r0, r1, out):
    """out[tok[p], h] += wts[p] * (down_h . act_p) for h in [r0, r1); act prepared as aq/as_/acorr [P, ...]."""
    nch = I // 128
    rowb, srow = I // 2, (I // gs) * 2
    y = np.empty((4, ROW_BLOCK), np.float32)
    for k in range(grp_e.shape[0]):
        base = grp_e[k] * stride
        prefetch_next(buf8, grp_e, k, stride, lay[2] + r0 * rowb, min(pfd, (r1 - r0) * rowb))
        prefetch_next(buf8, grp_e, k, stride, lay[5] + r0 * srow, min(pfd, (r1 - r0) * srow))
        for hb in range(r0, r1, ROW_BLOCK):
            nr = min(ROW_BLOCK, r1 - hb)
            wo, so = base + lay[2] + hb * rowb, base + lay[5] + hb * srow
            p = grp_ptr[k]
            while p < grp_ptr[k + 1]:
                nt = _block(grp_ptr[k + 1] - p)
                if nr >= 2:      # row pairs (A, A + db), see row_pairs
                    db, st = row_pairs(nr, rowb, pfd)
                    _call(isa, gs, nt, buf8, wo, wo + db * rowb, so, so + db * srow, st * srow, aq, p * I, as_, p * nch,
                          acorr, p * nch * 16, I, st * rowb, nch, nr // 2, y, 0, y, db, st, ROW_BLOCK, pfd)
                if nr % 2:
                    wl, sl = wo + (nr - 1) * rowb, so + (nr - 1) * srow
                    _call(isa, gs, nt, buf8, wl, wl, sl, sl, srow, aq, p * I, as_, p * nch, acorr, p * nch * 16, I,
                          rowb, nch, 1, y, nr - 1, y, nr - 1, 1, ROW_BLOCK, pfd)
                for t in range(nt):
                    for i in range(nr):
                        out[tok[p + t], hb + i] += wts[p + t] * y[t, i]
                p += nt

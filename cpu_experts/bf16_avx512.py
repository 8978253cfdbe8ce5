"""BF16 expert kernels, fast path (cpu_experts/ir.py), float32 activations and accumulation.

Contract as cpu_experts/fp8_avx512.py (pairs grouped by expert, x f32 [P, H] in pair order).
Needs H and I multiples of 32 and ir.supported(isa); `isa` (an index into ir.ISAS)
picks the AVX-512 or the AVX2 kernels, which read the same layouts.
"""
from __future__ import annotations

import numpy as np

from cpu_experts import ir
from cpu_experts.int4_vnni import _block, prefetch_next, row_pairs, float_index
from cpu_experts.jit import COL_BLOCK, ROW_BLOCK, kernel


@kernel
def _call(isa, nt, w, owa, owb, xa, oxa, xb, oxb, tx, wst, nch, n, oa, ooa, ob, oob, ost, otst, pfd, accum):
    """The IR kernel of ir.FLOAT_TABLES["bf16"] for this ISA (index into ir.ISAS) and token-block size; both rows from w."""
    ir.bf16(float_index(isa, nt), w, owa, w, owb, xa, oxa, xb, oxb, tx, wst, nch, n, oa, ooa, ob, oob, ost, otst, pfd, accum)


@kernel
def gateup(buf8, buf16, buf32, stride, lay, H, I, gs, grp_e, grp_ptr, x, isa, pfd, r0, r1, act):
    """act[p, r] = silu(gate . x_p) * (up . x_p) for r in [r0, r1); x f32 [P, H] in pair order."""
    for k in range(grp_e.shape[0]):
        base = grp_e[k] * stride
        p0, p1 = grp_ptr[k], grp_ptr[k + 1]
        n = p1 - p0
        kb = COL_BLOCK if n >= 4 else H             # decode: whole rows, one stream per row
        g = np.empty((n, ROW_BLOCK), np.float32)
        u = np.empty((n, ROW_BLOCK), np.float32)
        for rb in range(r0, r1, ROW_BLOCK):
            nr = min(ROW_BLOCK, r1 - rb)
            for c0 in range(0, H, kb):
                nc = min(kb, H - c0)
                q = 0
                while q < n:
                    nt = _block(n - q)
                    xo = (p0 + q) * H + c0
                    _call(isa, nt, buf8, base + lay[0] + (rb * H + c0) * 2, base + lay[1] + (rb * H + c0) * 2, x, xo, x, xo,
                          H, 2 * H, nc // 32, nr, g, q * ROW_BLOCK, u, q * ROW_BLOCK, 1, ROW_BLOCK, pfd,
                          1 if c0 > 0 else 0)
                    q += nt
            for q in range(n):
                for i in range(nr):
                    act[p0 + q, rb + i] = g[q, i] / (np.float32(1.0) + np.exp(-g[q, i])) * u[q, i]


@kernel
def down(buf8, buf16, buf32, stride, lay, H, I, gs, grp_e, grp_ptr, tok, wts, act, isa, pfd, r0, r1, out):
    """out[tok[p], h] += wts[p] * (down_h . act[p]) for h in [r0, r1); act f32 [P, I]."""
    for k in range(grp_e.shape[0]):
        base = grp_e[k] * stride
        prefetch_next(buf8, grp_e, k, stride, lay[2] + r0 * 2 * I, min(pfd, (r1 - r0) * 2 * I))
        p0, p1 = grp_ptr[k], grp_ptr[k + 1]
        n = p1 - p0
        kb = COL_BLOCK if n >= 4 else I
        y = np.empty((n, ROW_BLOCK), np.float32)
        junk = np.empty(4 * ROW_BLOCK, np.float32)
        for hb in range(r0, r1, ROW_BLOCK):
            nr = min(ROW_BLOCK, r1 - hb)
            wo = base + lay[2] + hb * 2 * I
            for c0 in range(0, I, kb):
                nc = min(kb, I - c0)
                acc = 1 if c0 > 0 else 0
                q = 0
                while q < n:
                    nt = _block(n - q)
                    xo, yo = (p0 + q) * I + c0, q * ROW_BLOCK
                    if nr >= 2:  # row pairs (A, A + db), see int4_vnni.row_pairs
                        db, st = row_pairs(nr, 2 * I, pfd)
                        _call(isa, nt, buf8, wo + 2 * c0, wo + db * 2 * I + 2 * c0, act, xo, act, xo, I, st * 2 * I,
                              nc // 32, nr // 2, y, yo, y, yo + db, st, ROW_BLOCK, pfd, acc)
                    if nr % 2:   # the last row runs as both A and B; B's result goes to a scratch row
                        wl = wo + (nr - 1) * 2 * I + 2 * c0
                        _call(isa, nt, buf8, wl, wl, act, xo, act, xo, I, 2 * I, nc // 32, 1, y, yo + nr - 1, junk, 0,
                              1, ROW_BLOCK, pfd, acc)
                    q += nt
            for q in range(n):
                for i in range(nr):
                    out[tok[p0 + q], hb + i] += wts[p0 + q] * y[q, i]

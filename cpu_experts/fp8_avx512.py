"""Block-FP8 expert kernels, fast path (cpu_experts/ir.py): exact e4m3 decode, float32 activations.

Contract as cpu_experts/int4_vnni.py (pairs grouped by expert, activations in pair order, rows
[r0, r1) per thread, ROW_BLOCK rows reused by every token of the group), with float activations
x f32 [P, H]. Inside a 128-row block every row shares the same column-block scales, so the driver
multiplies the activations once per (128-row block, token) by the expanded scales (and permutes them
to the kernel's order) and the IR loop is pure decode + FMA: 1/128 of extra work instead of a
multiply per weight. Needs H and I multiples of 64 and ir.supported(isa); `isa` (an index into ir.ISAS)
picks the AVX-512 or the AVX2 kernels, which read the same layouts.
"""
from __future__ import annotations

import numpy as np

from cpu_experts import ir
from cpu_experts.int4_vnni import _block, prefetch_next, row_pairs, float_index
from cpu_experts.jit import COL_BLOCK, ROW_BLOCK, kernel


@kernel
def _scaled(x, buf32, s0, n, dst):
    """dst[j] = x[j] * scale[s0 + j // 128], n % 64 == 0 (x already in the kernel's order, which only
    permutes inside each 64, so the 128-column scale blocks are unchanged)."""
    for cb in range(0, n, 128):
        s = buf32[s0 + cb // 128]
        xv = x[cb:cb + 128]
        dv = dst[cb:cb + 128]
        for j in range(min(128, n - cb)):
            dv[j] = xv[j] * s


@kernel
def in_kernel_order(x, order, out):
    """out[t, j] = x[t, order[j]] (order = ir.fp8_order(n)): activations as the kernel reads them. A loop here
    costs 0.3 us for one token of 256 inputs where np.take with out= took 2 us."""
    for t in range(x.shape[0]):
        for j in range(order.shape[0]):
            out[t, j] = x[t, order[j]]


@kernel
def _pos(r):
    """Where input r sits in the kernel's order (ir.fp8_order): r % 64 = 16L + 8a + 2m + b lands at
    16(2a + b) + 4L + m."""
    i = r & 63
    return (r & ~63) | ((2 * ((i >> 3) & 1) + (i & 1)) << 4) | ((i >> 4) << 2) | ((i >> 1) & 3)


@kernel
def _call(isa, nt, w, owa, owb, xa, oxa, xb, oxb, tx, wst, nch, n, oa, ooa, ob, oob, ost, otst, pfd, accum):
    """The IR kernel of ir.FLOAT_TABLES["fp8"] for this ISA (index into ir.ISAS) and token-block size; both rows from w."""
    ir.fp8(float_index(isa, nt), w, owa, w, owb, xa, oxa, xb, oxb, tx, wst, nch, n, oa, ooa, ob, oob, ost, otst, pfd, accum)


@kernel
def _rows(isa, nt, buf8, wo, rowb, nr, x, xo, tx, nc, out, oo, pfd, acc):
    """nr consecutive rows from byte wo (rowb bytes apart), in pairs (row_pairs) plus a single tail row, for nt tokens:
    out[oo + t * ROW_BLOCK + i] (+)= row i . x[xo + t * tx :]."""
    if nr >= 2:
        db, st = row_pairs(nr, rowb, pfd)
        _call(isa, nt, buf8, wo, wo + db * rowb, x, xo, x, xo, tx, st * rowb, nc // 64, nr // 2, out, oo, out, oo + db, st,
              ROW_BLOCK, pfd, acc)
    if nr % 2:           # the single last row runs as both A and B; B's result goes to a scratch row
        wl = wo + (nr - 1) * rowb
        junk = np.empty(4 * ROW_BLOCK, np.float32)
        _call(isa, nt, buf8, wl, wl, x, xo, x, xo, tx, rowb, nc // 64, 1, out, oo + nr - 1, junk, 0, 1,
              ROW_BLOCK, pfd, acc)


@kernel
def gateup(buf8, buf16, buf32, stride, lay, H, I, gs, grp_e, grp_ptr, x, isa, pfd, r0, r1, act):
    """act[p, pos(r)] = silu(gate . x_p) * (up . x_p) for r in [r0, r1); x f32 [P, H] in pair order, each
    row permuted by ir.fp8_order(H); act comes out in the same kind of order (ir.fp8_order(I)).

    Gate rows go in pairs, then up rows, so each pass reads one scaled activation row (28 KiB for K2,
    it stays in L1); pairing a gate row with an up row needed two and ran from L2.
    """
    nbc = (H + 127) // 128
    for k in range(grp_e.shape[0]):
        base = grp_e[k] * stride
        p0, p1 = grp_ptr[k], grp_ptr[k + 1]
        n = p1 - p0
        kb = COL_BLOCK if n >= 4 else H             # decode: whole rows, one stream
        xa = np.empty((n, H), np.float32)
        xb = np.empty((n, H), np.float32)
        g = np.empty((n, ROW_BLOCK), np.float32)
        u = np.empty((n, ROW_BLOCK), np.float32)
        r = r0
        while r < r1:
            end = min(r1, (r // 128 + 1) * 128)
            for q in range(n):
                _scaled(x[p0 + q], buf32, (base + lay[3]) // 4 + (r // 128) * nbc, H, xa[q])
                _scaled(x[p0 + q], buf32, (base + lay[4]) // 4 + (r // 128) * nbc, H, xb[q])
            for rb in range(r, end, ROW_BLOCK):
                nr = min(ROW_BLOCK, end - rb)
                for m in range(2):
                    xm = xa if m == 0 else xb
                    om = g if m == 0 else u
                    for c0 in range(0, H, kb):
                        nc = min(kb, H - c0)
                        q = 0
                        while q < n:
                            nt = _block(n - q)
                            _rows(isa, nt, buf8, base + lay[m] + rb * H + c0, H, nr, xm, q * H + c0, H, nc,
                                  om.reshape(-1), q * ROW_BLOCK, pfd, 1 if c0 > 0 else 0)
                            q += nt
                for q in range(n):                    # act is written in the kernel's order, for down()
                    for i in range(nr):
                        act[p0 + q, _pos(rb + i)] = g[q, i] / (np.float32(1.0) + np.exp(-g[q, i])) * u[q, i]
            r = end


@kernel
def down(buf8, buf16, buf32, stride, lay, H, I, gs, grp_e, grp_ptr, tok, wts, act, isa, pfd, r0, r1, out):
    """out[tok[p], h] += wts[p] * (down_h . act[p]) for h in [r0, r1); act f32 [P, I] as gateup wrote it
    (kernel order); out in natural order."""
    nbc = (I + 127) // 128
    for k in range(grp_e.shape[0]):
        base = grp_e[k] * stride
        prefetch_next(buf8, grp_e, k, stride, lay[2] + r0 * I, min(pfd, (r1 - r0) * I))
        p0, p1 = grp_ptr[k], grp_ptr[k + 1]
        n = p1 - p0
        kb = COL_BLOCK if n >= 4 else I
        xd = np.empty((n, I), np.float32)
        y = np.empty((n, ROW_BLOCK), np.float32)
        h = r0
        while h < r1:
            end = min(r1, (h // 128 + 1) * 128)
            for q in range(n):
                _scaled(act[p0 + q], buf32, (base + lay[5]) // 4 + (h // 128) * nbc, I, xd[q])
            for hb in range(h, end, ROW_BLOCK):
                nr = min(ROW_BLOCK, end - hb)
                for c0 in range(0, I, kb):
                    nc = min(kb, I - c0)
                    q = 0
                    while q < n:
                        nt = _block(n - q)
                        _rows(isa, nt, buf8, base + lay[2] + hb * I + c0, I, nr, xd, q * I + c0, I, nc, y.reshape(-1),
                              q * ROW_BLOCK, pfd, 1 if c0 > 0 else 0)
                        q += nt
                for q in range(n):
                    for i in range(nr):
                        out[tok[p0 + q], hb + i] += wts[p0 + q] * y[q, i]
            h = end

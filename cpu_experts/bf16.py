"""BF16 expert kernels in plain Numba (the exact baseline), float32 accumulation.

Same contract as cpu_experts/int4.py; `buf16` holds the weights as bf16 bit patterns and a bf16
value is its bits shifted left by 16, reinterpreted as float32 (exact).
"""
from __future__ import annotations

import numpy as np

from cpu_experts.jit import bits_to_f32, kernel


@kernel
def dot_row(buf16, c, x, n):
    """sum_j W[j] * x[j] for one row starting at uint16 index c."""
    acc = np.float32(0.0)
    for j in range(n):
        acc += bits_to_f32(np.uint32(buf16[c + j]) << 16) * x[j]
    return acc


@kernel
def gateup(buf8, buf16, buf32, stride, lay, H, I, gs, grp_e, grp_ptr, tok, x, r0, r1, act):
    """See int4.gateup (gs is ignored)."""
    for k in range(grp_e.shape[0]):
        base = grp_e[k] * stride
        for r in range(r0, r1):
            cg = (base + lay[0]) // 2 + r * H
            cu = (base + lay[1]) // 2 + r * H
            for p in range(grp_ptr[k], grp_ptr[k + 1]):
                xv = x[tok[p]]
                gv = dot_row(buf16, cg, xv, H)
                uv = dot_row(buf16, cu, xv, H)
                act[p, r] = gv / (np.float32(1.0) + np.exp(-gv)) * uv


@kernel
def down(buf8, buf16, buf32, stride, lay, H, I, gs, grp_e, grp_ptr, tok, wts, act, r0, r1, out):
    """See int4.down."""
    for k in range(grp_e.shape[0]):
        base = grp_e[k] * stride
        for h in range(r0, r1):
            c = (base + lay[2]) // 2 + h * I
            for p in range(grp_ptr[k], grp_ptr[k + 1]):
                out[tok[p], h] += wts[p] * dot_row(buf16, c, act[p], I)


@kernel
def dequant_rows(buf8, buf16, buf32, stride, lay, H, I, gs, e, which, row0, r0, r1, tile):
    """See int4.dequant_rows."""
    n = I if which == 2 else H
    base = (e * stride + lay[which]) // 2
    for r in range(r0, r1):
        for j in range(n):
            tile[r - row0, j] = bits_to_f32(np.uint32(buf16[base + r * n + j]) << 16)

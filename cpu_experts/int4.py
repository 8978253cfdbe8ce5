"""INT4 (group-wise, bf16 scales) expert kernels in plain Numba, float32 activations and accumulation.

T = tokens, P = (token, expert) pairs, G = groups of pairs that share an expert, H = hidden,
I = inter, g = group size. Weights are read straight from the LayerStore buffer: `buf8`, `buf16`,
`buf32` are uint8 / uint16 / float32 views of the same layer buffer and `lay` holds the section byte
offsets inside one expert (gate, up, down, gate_scale, up_scale, down_scale), see quant/layout.py.

Every function here is pure: outputs are passed in, preallocated by the caller, and each call writes
only rows [r0, r1) of them, so threads given disjoint row ranges never race. These are the exact
(float-activation) kernels; cpu_experts/int4_vnni.py holds the int8-activation fast path.
"""
from __future__ import annotations

import numpy as np

from cpu_experts.jit import bits_to_f32, kernel


@kernel
def dot_row(buf8, buf16, cb, sb, x, n, gs):
    """sum_j W[j] * x[j] for one packed row: codes at byte cb, scales at uint16 index sb, n inputs."""
    acc = np.float32(0.0)
    for g in range(n // gs):
        part = np.float32(0.0)
        for b in range(gs // 32):
            c = cb + (g * gs + b * 32) // 2
            xo = g * gs + b * 32
            for j in range(16):
                v = np.int32(buf8[c + j])
                part += np.float32((v & 15) - 8) * x[xo + j] + np.float32((v >> 4) - 8) * x[xo + 16 + j]
        acc += part * bits_to_f32(np.uint32(buf16[sb + g]) << 16)
    return acc


@kernel
def dequant_row(buf8, buf16, cb, sb, n, gs, dst):
    """dst[:n] = dequantized row (float32)."""
    for g in range(n // gs):
        s = bits_to_f32(np.uint32(buf16[sb + g]) << 16)
        for b in range(gs // 32):
            c = cb + (g * gs + b * 32) // 2
            xo = g * gs + b * 32
            for j in range(16):
                v = np.int32(buf8[c + j])
                dst[xo + j] = np.float32((v & 15) - 8) * s
                dst[xo + 16 + j] = np.float32((v >> 4) - 8) * s


@kernel
def gateup(buf8, buf16, buf32, stride, lay, H, I, gs, grp_e, grp_ptr, tok, x, r0, r1, act):
    """act[p, r] = silu(gate_e[r] . x[tok[p]]) * (up_e[r] . x[tok[p]]) for rows r in [r0, r1).

    grp_e int64 [G], grp_ptr int64 [G+1] (pairs of group k are grp_ptr[k]:grp_ptr[k+1]), tok int64 [P],
    x f32 [T, H] C-contiguous, act f32 [P, I] (caller allocates; only columns r0:r1 are written).
    """
    for k in range(grp_e.shape[0]):
        base = grp_e[k] * stride
        for r in range(r0, r1):
            cg = base + lay[0] + r * (H // 2)
            cu = base + lay[1] + r * (H // 2)
            sg = (base + lay[3]) // 2 + r * (H // gs)
            su = (base + lay[4]) // 2 + r * (H // gs)
            for p in range(grp_ptr[k], grp_ptr[k + 1]):
                xv = x[tok[p]]
                gv = dot_row(buf8, buf16, cg, sg, xv, H, gs)
                uv = dot_row(buf8, buf16, cu, su, xv, H, gs)
                act[p, r] = gv / (np.float32(1.0) + np.exp(-gv)) * uv


@kernel
def down(buf8, buf16, buf32, stride, lay, H, I, gs, grp_e, grp_ptr, tok, wts, act, r0, r1, out):
    """out[tok[p], h] += wts[p] * (down_e[h] . act[p]) for rows h in [r0, r1); out f32 [T, H]."""
    for k in range(grp_e.shape[0]):
        base = grp_e[k] * stride
        for h in range(r0, r1):
            c = base + lay[2] + h * (I // 2)
            s = (base + lay[5]) // 2 + h * (I // gs)
            for p in range(grp_ptr[k], grp_ptr[k + 1]):
                out[tok[p], h] += wts[p] * dot_row(buf8, buf16, c, s, act[p], I, gs)


@kernel
def dequant_rows(buf8, buf16, buf32, stride, lay, H, I, gs, e, which, row0, r0, r1, tile):
    """tile[r - row0, :] = row r of matrix `which` (0 gate, 1 up, 2 down) of expert e, as float32."""
    n = I if which == 2 else H
    base = e * stride
    for r in range(r0, r1):
        dequant_row(buf8, buf16, base + lay[which] + r * (n // 2), (base + lay[3 + which]) // 2 + r * (n // gs),
                    n, gs, tile[r - row0])

"""Block-FP8 (e4m3fn, 128x128 float32 scale_inv) expert kernels in plain Numba, float32 accumulation.

Same contract as cpu_experts/int4.py (buffers, `lay`, pairs, row ranges). The codes are the released
bytes. Decoding is exact and table-free (tables become slow gathers, docs/kernels.md): byte b = s eeee mmm
becomes the half-precision pattern s 0 eeee mmm 0000000, whose value is exactly e4m3(b) * 2^-8
(subnormals included), and the hardware converts half to float. The 2^8 goes back once per row.
Caveat: the two NaN codes (0x7F, 0xFF) decode as +-1.875*2^8 here, not NaN; released weights and our
quantizer never contain them.
"""
from __future__ import annotations

import numpy as np

from cpu_experts.jit import f32_to_bits, half_bits_to_f32, kernel


@kernel
def e4m3_times_2m8(b):
    v = np.int32(b)
    return half_bits_to_f32(((v & 0x80) << 8) | ((v & 0x7F) << 7))


@kernel
def dot_row(buf8, buf32, cb, sb, x, n):
    """sum_j W[j] * x[j] for one row: codes at byte cb, that row's block scales at float32 index sb."""
    acc = np.float32(0.0)
    for blk in range(0, n, 128):
        part = np.float32(0.0)
        for j in range(blk, min(blk + 128, n)):
            part += e4m3_times_2m8(buf8[cb + j]) * x[j]
        acc += part * buf32[sb + blk // 128]
    return acc * np.float32(256.0)


@kernel
def dequant_row(buf8, buf32, cb, sb, n, dst):
    for blk in range(0, n, 128):
        s = buf32[sb + blk // 128] * np.float32(256.0)
        for j in range(blk, min(blk + 128, n)):
            dst[j] = e4m3_times_2m8(buf8[cb + j]) * s


@kernel
def gateup(buf8, buf16, buf32, stride, lay, H, I, gs, grp_e, grp_ptr, tok, x, r0, r1, act):
    """See int4.gateup (gs is ignored)."""
    nb = (H + 127) // 128
    for k in range(grp_e.shape[0]):
        base = grp_e[k] * stride
        for r in range(r0, r1):
            sg = (base + lay[3]) // 4 + (r // 128) * nb
            su = (base + lay[4]) // 4 + (r // 128) * nb
            for p in range(grp_ptr[k], grp_ptr[k + 1]):
                xv = x[tok[p]]
                gv = dot_row(buf8, buf32, base + lay[0] + r * H, sg, xv, H)
                uv = dot_row(buf8, buf32, base + lay[1] + r * H, su, xv, H)
                act[p, r] = gv / (np.float32(1.0) + np.exp(-gv)) * uv


@kernel
def down(buf8, buf16, buf32, stride, lay, H, I, gs, grp_e, grp_ptr, tok, wts, act, r0, r1, out):
    """See int4.down."""
    nb = (I + 127) // 128
    for k in range(grp_e.shape[0]):
        base = grp_e[k] * stride
        for h in range(r0, r1):
            s = (base + lay[5]) // 4 + (h // 128) * nb
            for p in range(grp_ptr[k], grp_ptr[k + 1]):
                out[tok[p], h] += wts[p] * dot_row(buf8, buf32, base + lay[2] + h * I, s, act[p], I)


@kernel
def dequant_rows(buf8, buf16, buf32, stride, lay, H, I, gs, e, which, row0, r0, r1, tile):
    """See int4.dequant_rows."""
    n = I if which == 2 else H
    nb = (n + 127) // 128
    base = e * stride
    for r in range(r0, r1):
        dequant_row(buf8, buf32, base + lay[which] + r * n, (base + lay[3 + which]) // 4 + (r // 128) * nb,
                    n, tile[r - row0])


@kernel
def to_bf16_rows(codes, scales, r0, r1, out):
    """Rows [r0, r1) of a block-FP8 matrix (codes uint8 [R, C], scales float32 [ceil(R/128), ceil(C/128)]) as
    bf16 bit patterns in out (uint16 [R, C]): each value code x scale in float32, rounded once to nearest even
    (the same bits as hybrid/runtime/decode.py's fp8_into into bfloat16). For a prefill GEMM on bf16."""
    n = codes.shape[1]
    for i in range(r0, r1):
        srow = scales[i // 128]
        for blk in range(0, n, 128):
            s = srow[blk // 128] * np.float32(256.0)
            for j in range(blk, min(blk + 128, n)):
                b = f32_to_bits(e4m3_times_2m8(codes[i, j]) * s)
                out[i, j] = np.uint16((b + np.uint32(0x7FFF) + ((b >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16))

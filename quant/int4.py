"""INT4, symmetric, one scale per group of `group_size` inputs of a row (default 32, bf16 scales).

W [out, in] is stored as integer codes Q in [-8, 7] and scales S [out, in / group_size]:
    W[i, j] = Q[i, j] * S[i, j // group_size]
Scales are carried as uint16 bit patterns (bf16 by default, fp16 optional) so that K2-Thinking's
native INT4 (compressed-tensors pack-quantized: symmetric, group 32, bf16 scales, codes in [-8, 7])
maps into this format without loss. Our own quantizer uses S = bf16(amax / 7) and
Q = clip(rint(W / S), -8, 7), so it produces codes in [-7, 7]; -8 is still representable.

Packed layout (what the kernels read), per row, llama.cpp-Q4_0 style: the row is cut into blocks of
32 inputs; block b becomes 16 bytes where byte j holds (Q[32b + j] + 8) in its low nibble and
(Q[32b + 16 + j] + 8) in its high nibble. So one 64-byte load holds 4 whole blocks, its low nibbles
are 64 consecutive-by-block inputs and its high nibbles the other 64, which lets a kernel feed whole
vector lanes with one AND or one shift (docs/formats.md, docs/kernels.md). Row r's bytes are [r * in/2, (r+1) * in/2).

This numpy code is the reference the Numba kernels are tested against, bit-exact.
"""
from __future__ import annotations

import numpy as np

from quant.formats import SCALE_CODECS

NIBBLE_BLOCK = 32
GROUP_SIZES = (32, 64, 128)


def check_shape(out_features: int, in_features: int, group_size: int) -> None:
    if group_size not in GROUP_SIZES:
        raise ValueError(f"int4 group_size={group_size} is not supported; use one of {GROUP_SIZES}")
    if in_features % group_size or in_features % NIBBLE_BLOCK:
        raise ValueError(
            f"int4 needs the input dimension ({in_features}) to be a multiple of the group size "
            f"({group_size}) and of {NIBBLE_BLOCK}; pad the weight or use fmt='fp8'/'bf16'")


def _codec(scale_dtype: str):
    if scale_dtype not in SCALE_CODECS:
        raise ValueError(f"int4 scale_dtype={scale_dtype!r}; use 'bf16' (default) or 'fp16'")
    return SCALE_CODECS[scale_dtype]


def quantize_groups(w: np.ndarray, group_size: int = 32, scale_dtype: str = "bf16"):
    """float [out, in] -> (q int8 [out, in] in [-7, 7], scales uint16 bit patterns [out, in/group]).

    S = round_to_scale_dtype(amax_group / 7) (0 for an all-zero group, whose codes are 0);
    Q = clip(rint(W / S), -8, 7) computed with the rounded S, so dequantization is consistent.
    """
    w = np.asarray(w, dtype=np.float32)
    if w.ndim != 2:
        raise ValueError(f"quantize_groups expects a 2-D weight, got shape {w.shape}")
    check_shape(*w.shape, group_size)
    encode, decode = _codec(scale_dtype)
    g = w.reshape(w.shape[0], -1, group_size)
    amax = np.abs(g).max(axis=2)
    scales = encode(amax / np.float32(7.0))
    s = decode(scales)[:, :, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(s > 0, np.rint(g / s), 0.0)
    q = np.clip(q, -8, 7).astype(np.int8).reshape(w.shape)
    return q, scales


def dequantize_groups(q: np.ndarray, scales: np.ndarray, group_size: int = 32,
                      scale_dtype: str = "bf16") -> np.ndarray:
    """(q int8 [out, in], scales uint16 [out, in/group]) -> float32 [out, in] = q * scale."""
    q = np.asarray(q)
    check_shape(*q.shape, group_size)
    if scales.shape != (q.shape[0], q.shape[1] // group_size):
        raise ValueError(f"int4 scales have shape {scales.shape}, expected "
                         f"{(q.shape[0], q.shape[1] // group_size)} for codes {q.shape} and group {group_size}")
    _, decode = _codec(scale_dtype)
    s = decode(scales)
    g = q.astype(np.float32).reshape(q.shape[0], -1, group_size) * s[:, :, None]
    return g.reshape(q.shape)


def pack(q: np.ndarray) -> np.ndarray:
    """int codes [out, in] in [-8, 7] -> packed uint8 [out, in/2] in the kernel layout (module doc)."""
    q = np.asarray(q)
    if q.ndim != 2 or q.shape[1] % NIBBLE_BLOCK:
        raise ValueError(f"int4 pack needs [out, in] with in a multiple of {NIBBLE_BLOCK}, got {q.shape}")
    if q.size and (q.min() < -8 or q.max() > 7):
        raise ValueError(f"int4 codes must lie in [-8, 7], got [{q.min()}, {q.max()}]")
    u = (q.astype(np.int16) + 8).astype(np.uint8).reshape(q.shape[0], -1, 2, 16)
    return (u[:, :, 0, :] | (u[:, :, 1, :] << 4)).reshape(q.shape[0], q.shape[1] // 2)


def unpack(p: np.ndarray) -> np.ndarray:
    """packed uint8 [out, in/2] -> int8 codes [out, in] in [-8, 7]; the inverse of pack."""
    p = np.asarray(p, dtype=np.uint8)
    b = p.reshape(p.shape[0], -1, 1, 16)
    u = np.concatenate([b & 0xF, b >> 4], axis=2)
    return (u.astype(np.int8) - 8).reshape(p.shape[0], p.shape[1] * 2)

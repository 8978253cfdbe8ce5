"""Block FP8 (e4m3fn, 128x128 blocks): the format of the official Kimi K2 / DeepSeek-V3 release.

A weight W [out, in] is stored as e4m3fn codes Q [out, in] (one byte each) and a float32 grid
`weight_scale_inv` S [ceil(out/128), ceil(in/128)]. Dequantization MULTIPLIES:
    W[i, j] = e4m3(Q[i, j]) * S[i // 128, j // 128]
The last block of each dimension may be partial (K2's kv_a_proj_with_mqa has 576 rows).

This numpy code is the reference every fast path is tested against, bit-exact.
e4m3fn: 1 sign, 4 exponent (bias 7), 3 mantissa bits; no infinities; 0x7F/0xFF are NaN; max 448.
"""
from __future__ import annotations

import numpy as np

BLOCK = 128
E4M3_MAX = 448.0


def _e4m3_table() -> np.ndarray:
    codes = np.arange(256, dtype=np.uint32)
    sign = np.where(codes & 0x80, -1.0, 1.0)
    exp = (codes >> 3) & 0xF
    man = (codes & 0x7).astype(np.float64)
    val = np.where(exp == 0, man / 8.0 * 2.0**-6, (1.0 + man / 8.0) * 2.0 ** (exp.astype(np.float64) - 7))
    val = sign * val
    val[(codes & 0x7F) == 0x7F] = np.nan
    return val.astype(np.float32)


E4M3_VALUES = _e4m3_table()          # float32 [256]: the value of every code
_POS = E4M3_VALUES[:127].astype(np.float64)   # codes 0..126, ascending, all finite


def e4m3_decode(q: np.ndarray) -> np.ndarray:
    """Codes (uint8, any shape) -> float32 values, exact."""
    return E4M3_VALUES[np.asarray(q, dtype=np.uint8)]


def e4m3_encode(x: np.ndarray) -> np.ndarray:
    """float values -> uint8 e4m3fn codes, round to nearest, ties to even code (as torch casts).

    |x| above 448 saturates to 448 (the block quantizer never produces such values; torch would
    give NaN there). NaN maps to 0x7F.
    """
    x = np.asarray(x, dtype=np.float32)
    a = np.abs(x).astype(np.float64)
    hi = np.clip(np.searchsorted(_POS, a, side="left"), 1, 126)
    lo = hi - 1
    d_lo = a - _POS[lo]
    d_hi = _POS[hi] - a
    pick_hi = (d_hi < d_lo) | ((d_hi == d_lo) & (hi % 2 == 0))
    code = np.where(pick_hi, hi, lo)
    code = np.where(a >= _POS[126], 126, code)
    code = np.where(a <= 0.0, 0, code).astype(np.uint8)
    code = code | np.where(np.signbit(x), 0x80, 0).astype(np.uint8)
    code[np.isnan(x)] = 0x7F
    return code


def scale_grid_shape(out_features: int, in_features: int, block: int = BLOCK) -> tuple[int, int]:
    """Shape of `weight_scale_inv` for a [out, in] weight: ceil division by the block."""
    return (-(-out_features // block), -(-in_features // block))


def _expand(scale_inv: np.ndarray, shape: tuple[int, int], block: int) -> np.ndarray:
    return np.repeat(np.repeat(scale_inv, block, axis=0), block, axis=1)[: shape[0], : shape[1]]


def quantize_blocks(w: np.ndarray, block: int = BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """float [out, in] -> (codes uint8 [out, in], scale_inv float32 [ceil(out/b), ceil(in/b)]).

    Per block, scale_inv = amax / 448 (1.0 for an all-zero block), codes = e4m3(w / scale_inv),
    as DeepSeek's reference quantizer does.
    """
    w = np.asarray(w, dtype=np.float32)
    if w.ndim != 2:
        raise ValueError(f"quantize_blocks expects a 2-D weight, got shape {w.shape}")
    gr, gc = scale_grid_shape(*w.shape, block)
    pad = np.zeros((gr * block, gc * block), dtype=np.float32)
    pad[: w.shape[0], : w.shape[1]] = w
    amax = np.abs(pad.reshape(gr, block, gc, block)).max(axis=(1, 3))
    scale_inv = np.where(amax > 0, amax / np.float32(E4M3_MAX), np.float32(1.0)).astype(np.float32)
    q = e4m3_encode(w / _expand(scale_inv, w.shape, block))
    return q, scale_inv


def dequantize_blocks(q: np.ndarray, scale_inv: np.ndarray, block: int = BLOCK) -> np.ndarray:
    """(codes uint8 [out, in], scale_inv [ceil(out/b), ceil(in/b)]) -> float32 [out, in]."""
    q = np.asarray(q, dtype=np.uint8)
    expect = scale_grid_shape(*q.shape, block)
    if tuple(scale_inv.shape) != expect:
        raise ValueError(
            f"weight_scale_inv has shape {tuple(scale_inv.shape)} but a {tuple(q.shape)} weight with "
            f"{block}x{block} blocks needs {expect}")
    return e4m3_decode(q) * _expand(np.asarray(scale_inv, dtype=np.float32), q.shape, block)


def quantize_blocks_torch(w, block: int = BLOCK):
    """Torch twin of quantize_blocks for large tensors (make-tiny's bench model has ~5 GiB of experts).

    Returns (codes torch.float8_e4m3fn [out, in], scale_inv torch.float32 grid); tested bit-equal to the
    numpy reference. Same math: scale_inv = amax/448 per block (1 for zero blocks), codes = cast(w/scale).
    """
    import torch
    w = w.float()
    out_f, in_f = w.shape
    gr, gc = scale_grid_shape(out_f, in_f, block)
    pad = torch.zeros(gr * block, gc * block, dtype=torch.float32, device=w.device)
    pad[:out_f, :in_f] = w
    amax = pad.view(gr, block, gc, block).abs().amax(dim=(1, 3))
    scale_inv = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))
    full = scale_inv.repeat_interleave(block, 0).repeat_interleave(block, 1)[:out_f, :in_f]
    return (w / full).to(torch.float8_e4m3fn), scale_inv

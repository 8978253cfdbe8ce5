"""The one encode / decode pair per format over the stored arrays of one weight matrix.

A matrix W [N, K] is stored as the arrays quant/formats.py's table lists (Format.sections): int4 packed
codes uint8 [N, K/2] + bf16 scale bits uint16 [N, K/g]; fp8 e4m3 codes uint8 [N, K] + float32
weight_scale_inv [ceil(N/128), ceil(K/128)]; bf16 bit patterns uint16 [N, K]. The expert store
(quant/store.py) and the packed dense matrices (quant/packed.py) both go through these two functions, and
decode() is the numpy reference every kernel is tested against.
"""
from __future__ import annotations

import numpy as np

from quant import fp8 as qfp8
from quant import int4 as qint4
from quant.formats import bf16_bits_to_f32, f32_to_bf16_bits, get_format


def encode(fmt: str, w: np.ndarray, group_size: int = 32) -> tuple[np.ndarray, np.ndarray | None]:
    """float [N, K] -> (codes, scales or None) in `fmt`, by the reference quantizers (int4: symmetric
    groups, quant/int4.py; fp8: 128x128 blocks, quant/fp8.py; bf16: round to nearest even)."""
    get_format(fmt)
    w = np.asarray(w, dtype=np.float32)
    if fmt == "int4":
        q, scales = qint4.quantize_groups(w, group_size)
        return qint4.pack(q), scales
    if fmt == "fp8":
        return qfp8.quantize_blocks(w)
    return f32_to_bf16_bits(w), None


def decode(fmt: str, codes: np.ndarray, scales: np.ndarray | None, group_size: int = 32) -> np.ndarray:
    """(codes, scales) of one matrix in `fmt` -> float32 [N, K], exact (the reference)."""
    get_format(fmt)
    if fmt == "int4":
        return qint4.dequantize_groups(qint4.unpack(codes), scales, group_size)
    if fmt == "fp8":
        return qfp8.dequantize_blocks(codes, scales)
    return bf16_bits_to_f32(codes)

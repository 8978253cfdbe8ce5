"""The one encode / decode pair per format over the stored arrays of one weight matrix.

A matrix W [N, K] is stored as the arrays quant/formats.py's table lists (Format.sections): int4 packed
codes uint8 [N, K/2] + bf16 scale bits uint16 [N, K/g]; fp8 e4m3 codes uint8 [N, K] + float32
weight_scale_inv [ceil(N/128), ceil(K/128)]; bf16 bit patterns uint16 [N, K]. The expert store
(quant/store.py), the packed dense matrices (quant/packed.py) and the dense reader (quant/dense.py) all go
through encode() and decode(), and decode() is the numpy reference every kernel is tested against.

CODECS is the per-format table (ggml's type_traits: one entry per format of quant/formats.py, keyed alike);
a format without an entry fails at import, not by falling through to another format's code.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from quant import fp8 as qfp8
from quant import int4 as qint4
from quant.formats import FORMAT_NAMES, bf16_bits_to_f32, f32_to_bf16_bits, get_format

Codes = tuple[np.ndarray, np.ndarray | None]          # (codes, scales or None)


@dataclass(frozen=True)
class Codec:
    """One format's reference pair. encode(w float32 [N, K], group_size) -> (codes, scales or None);
    decode(codes, scales or None, group_size) -> float32 [N, K], exact. group_size matters to int4 only."""
    encode: Callable[[np.ndarray, int], Codes]
    decode: Callable[[np.ndarray, np.ndarray | None, int], np.ndarray]


def _int4_encode(w: np.ndarray, group_size: int) -> Codes:
    q, scales = qint4.quantize_groups(w, group_size)          # symmetric groups, bf16 scales
    return qint4.pack(q), scales


def _int4_decode(codes: np.ndarray, scales: np.ndarray | None, group_size: int) -> np.ndarray:
    return qint4.dequantize_groups(qint4.unpack(codes), scales, group_size)


def _fp8_encode(w: np.ndarray, group_size: int) -> Codes:
    return qfp8.quantize_blocks(w)                             # 128x128 blocks, float32 weight_scale_inv


def _fp8_decode(codes: np.ndarray, scales: np.ndarray | None, group_size: int) -> np.ndarray:
    return qfp8.dequantize_blocks(codes, scales)


def _bf16_encode(w: np.ndarray, group_size: int) -> Codes:
    return f32_to_bf16_bits(w), None                           # round to nearest even


def _bf16_decode(codes: np.ndarray, scales: np.ndarray | None, group_size: int) -> np.ndarray:
    return bf16_bits_to_f32(codes)


CODECS = {"int4": Codec(_int4_encode, _int4_decode),
          "fp8": Codec(_fp8_encode, _fp8_decode),
          "bf16": Codec(_bf16_encode, _bf16_decode)}
assert tuple(CODECS) == FORMAT_NAMES, "one codec per format of quant/formats.py"


def encode(fmt: str, w: np.ndarray, group_size: int = 32) -> Codes:
    """float [N, K] -> (codes, scales or None) in `fmt`, by the reference quantizers (int4: symmetric
    groups, quant/int4.py; fp8: 128x128 blocks, quant/fp8.py; bf16: round to nearest even)."""
    get_format(fmt)
    return CODECS[fmt].encode(np.asarray(w, dtype=np.float32), group_size)


def decode(fmt: str, codes: np.ndarray, scales: np.ndarray | None, group_size: int = 32) -> np.ndarray:
    """(codes, scales) of one matrix in `fmt` -> float32 [N, K], exact (the reference)."""
    get_format(fmt)
    return CODECS[fmt].decode(codes, scales, group_size)

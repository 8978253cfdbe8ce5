"""Number formats of the routed-expert store: a table entry per format plus the bf16/fp16 codecs.

gguf-py style: a format is described by data (bits per weight, scale layout), and its quantize /
dequantize pair lives in plain numpy (quant/int4.py, quant/fp8.py, bf16 here). Those numpy functions
are the references the Numba kernels in cpu_experts/ are tested against, bit-exact.

bf16 and fp16 values are carried as uint16 bit patterns (numpy has no bfloat16 dtype), so a value
read from a checkpoint survives a round trip through our files unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Format:
    name: str
    weight_bits: int        # bits per stored weight code
    scale_bytes: int        # bytes per scale value (0: none)
    scale_block: str        # what one scale covers, in words


FORMATS = {
    "int4": Format("int4", 4, 2, "a group of `group_size` (default 32) inputs of one row; bf16 scale"),
    "fp8": Format("fp8", 8, 4, "a 128x128 block (float32 weight_scale_inv, multiplied)"),
    "bf16": Format("bf16", 16, 0, "none: the weights themselves"),
}


FORMAT_NAMES = tuple(FORMATS)      # the allowed format names, in this order everywhere


def get_format(name: str) -> Format:
    if name not in FORMATS:
        raise ValueError(f"unknown expert format {name!r}; choose one of {sorted(FORMATS)}")
    return FORMATS[name]


def bytes_per_matrix(fmt: str, rows: int, cols: int, group_size: int = 32) -> int:
    """Bytes of one [rows, cols] weight (codes + scales) in `fmt`, before alignment padding."""
    if fmt == "int4":
        return rows * cols // 2 + rows * (cols // group_size) * 2
    if fmt == "fp8":
        return rows * cols + (-(-rows // 128)) * (-(-cols // 128)) * 4
    if fmt == "bf16":
        return rows * cols * 2
    get_format(fmt)
    raise AssertionError("unreachable")


def f32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bit patterns (uint16), round to nearest even as torch does; NaN stays NaN."""
    b = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = (b + np.uint32(0x7FFF) + ((b >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
    nan = (b & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    out = np.where(nan, (b >> np.uint32(16)) | np.uint32(0x40), rounded)
    return out.astype(np.uint16)


def bf16_bits_to_f32(b: np.ndarray) -> np.ndarray:
    """bf16 bit patterns (uint16) -> float32, exact."""
    return (np.asarray(b, dtype=np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)


def f32_to_fp16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> IEEE half bit patterns (uint16), round to nearest even (numpy's cast)."""
    return np.asarray(x, dtype=np.float32).astype(np.float16).view(np.uint16)


def fp16_bits_to_f32(b: np.ndarray) -> np.ndarray:
    """IEEE half bit patterns (uint16) -> float32, exact."""
    return np.asarray(b, dtype=np.uint16).view(np.float16).astype(np.float32)


SCALE_CODECS = {
    "bf16": (f32_to_bf16_bits, bf16_bits_to_f32),
    "fp16": (f32_to_fp16_bits, fp16_bits_to_f32),
}

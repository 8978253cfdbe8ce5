"""Number formats of stored weights (routed experts and dense linears): a table entry per format plus
the bf16/fp16 codecs.

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
    """One number format of stored weights, as data: byte counts, the stored arrays' shapes (the expert
    layout, the packed dense matrices) and every list of allowed names (FORMAT_NAMES) are read from this
    table, nowhere else. Tables of another layer keyed by format (the codecs in quant/codec.py, the kernels
    in cpu_experts/paths.py, the device decoders in hybrid/runtime/decode.py, calibrated rates) are keyed
    by FORMAT_NAMES and checked against it by tests/quant/test_format_tables.py."""
    name: str
    weight_bits: int          # bits per stored weight code
    code_dtype: str           # numpy dtype the codes are stored in (two int4 codes per uint8)
    scale_dtype: str | None   # numpy dtype of one scale (bf16 scales as uint16 bit patterns); None: no scales
    scale_rows: int           # rows of the weight one scale covers
    scale_cols: int | None    # inputs of a row one scale covers (None: the int4 group size)
    scale_block: str          # what one scale covers, in words
    max_rel_error: float      # worst rounding error of one weight by the reference quantizer, relative to the
    #                           max |w| of its scale block (quant/verify.py's bound; see FORMATS)
    ggml_type: str            # the closest llama.cpp type (gguf.GGMLQuantizationType's name): the bench's peer

    @property
    def scale_bytes(self) -> int:
        return np.dtype(self.scale_dtype).itemsize if self.scale_dtype else 0

    def sections(self, rows: int, cols: int, group_size: int = 32) -> tuple[tuple[str, tuple, str], ...]:
        """(suffix, shape, dtype) of the arrays one [rows, cols] weight is stored as: the codes (suffix "")
        then the scales ("_scale"), if any. Partial scale blocks at the edges count whole (fp8's
        128x128 grid is a ceil division); int4 callers check cols % group_size first (quant/int4.py)."""
        per_item = np.dtype(self.code_dtype).itemsize * 8 // self.weight_bits
        out = (("", (rows, cols // per_item), self.code_dtype),)
        if self.scale_dtype:
            sc = group_size if self.scale_cols is None else self.scale_cols
            out += (("_scale", (-(-rows // self.scale_rows), -(-cols // sc)), self.scale_dtype),)
        return out

    def nbytes(self, rows: int, cols: int, group_size: int = 32) -> int:
        """Bytes of one [rows, cols] weight (codes + scales), before alignment padding."""
        return sum(int(np.prod(shape)) * np.dtype(dt).itemsize for _, shape, dt in self.sections(rows, cols, group_size))


# max_rel_error: int4 rounds to steps of (group max)/7, half a step is 1/14 of the group max; e4m3 keeps 3
# mantissa bits, half an ulp is at most 1/16 of the block max; bf16 keeps 8 bits (2^-9, doubled for margin).
FORMATS = {
    "int4": Format("int4", 4, "uint8", "uint16", 1, None,
                   "a group of `group_size` (default 32) inputs of one row; bf16 scale",
                   max_rel_error=1 / 14, ggml_type="Q4_0"),
    "fp8": Format("fp8", 8, "uint8", "float32", 128, 128, "a 128x128 block (float32 weight_scale_inv, multiplied)",
                  max_rel_error=1 / 16, ggml_type="Q8_0"),
    "bf16": Format("bf16", 16, "uint16", None, 1, 1, "none: the weights themselves (bf16 bit patterns)",
                   max_rel_error=2 ** -8, ggml_type="BF16"),
}
FORMAT_NAMES = tuple(FORMATS)          # ("int4", "fp8", "bf16"): the allowed format names, in this order
# Formats whose stored form is smaller than the bf16 compute form: a packed hot set keeps these as stored.
COMPACT_FORMATS = tuple(f.name for f in FORMATS.values() if f.weight_bits < 16)


def get_format(name: str) -> Format:
    if name not in FORMATS:
        raise ValueError(f"unknown weight format {name!r}; choose one of {', '.join(FORMAT_NAMES)}")
    return FORMATS[name]


def bytes_per_matrix(fmt: str, rows: int, cols: int, group_size: int = 32) -> int:
    """Bytes of one [rows, cols] weight (codes + scales) in `fmt`, before alignment padding."""
    return get_format(fmt).nbytes(rows, cols, group_size)


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

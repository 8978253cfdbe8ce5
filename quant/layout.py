"""Byte layout of one expert inside a LayerStore buffer (layout version 1).

E = experts, H = hidden, I = inter (moe_intermediate_size), g = int4 group size.
One expert is one contiguous slice of `stride` bytes (a multiple of 4 KiB, so an expert is also a
whole number of pages for mmap and for copies to the GPU). Inside it, sections follow each other,
each starting on a 64-byte boundary (one cache line, one zmm load):

  int4: gate codes [I, H/2] u8 | up codes [I, H/2] u8 | down codes [H, I/2] u8 |
        gate scales [I, H/g] u16 | up scales [I, H/g] u16 | down scales [H, I/g] u16     (bf16 bits)
  fp8:  gate codes [I, H] u8 | up codes [I, H] u8 | down codes [H, I] u8 |
        gate scale_inv [ceil(I/128), ceil(H/128)] f32 | up ... | down [ceil(H/128), ceil(I/128)] f32
  bf16: gate [I, H] u16 | up [I, H] u16 | down [H, I] u16                                  (bf16 bits)

int4 codes use the packed nibble layout of quant/int4.py; fp8 codes and scales are the released
block-FP8 tensors byte for byte. Rows are row-major so a kernel streams one row with one pointer.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from quant.formats import get_format

LAYOUT_VERSION = 1
SECTION_ALIGN = 64
EXPERT_ALIGN = 4096
MATRICES = ("gate", "up", "down")


def _up(n: int, a: int) -> int:
    return -(-n // a) * a


@dataclass(frozen=True)
class Section:
    offset: int           # bytes from the start of the expert
    shape: tuple          # array shape
    dtype: str            # numpy dtype name

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * np.dtype(self.dtype).itemsize


@dataclass(frozen=True)
class Layout:
    sections: dict        # name ("gate", "gate_scale", ...) -> Section
    used: int             # bytes of weights + scales (no padding)
    stride: int           # bytes from one expert to the next


def matrix_shape(name: str, hidden: int, inter: int) -> tuple[int, int]:
    return (hidden, inter) if name == "down" else (inter, hidden)


def make_layout(fmt: str, hidden: int, inter: int, group_size: int = 32) -> Layout:
    f = get_format(fmt)
    per_matrix = [[(m + suffix, shape, dt) for suffix, shape, dt in f.sections(*matrix_shape(m, hidden, inter), group_size)]
                  for m in MATRICES]
    shapes = [s[0] for s in per_matrix] + [s[1] for s in per_matrix if len(s) > 1]   # codes first, then scales
    sections, off, used = {}, 0, 0
    for name, shape, dt in shapes:
        s = Section(off, shape, dt)
        sections[name] = s
        used += s.nbytes
        off = _up(off + s.nbytes, SECTION_ALIGN)
    return Layout(sections, used, _up(off, EXPERT_ALIGN))

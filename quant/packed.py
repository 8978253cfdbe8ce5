"""PackedMatrix: a dense weight W [G, N, K] kept in its stored format (int4, fp8 or bf16), in one buffer.

G = groups (1 for a plain linear; heads for MLA's absorbed kv_b), N = output rows, K = inputs.

One uint8 buffer holds the groups one after the other, `stride` bytes apart; inside a group the codes come
first, then the scales (if the format has any) at `scale_offset`, each section 64-byte aligned: the same
arrays, in the same layout, as one matrix of an expert in the LayerStore (quant/layout.py), so the expert
kernels read a PackedMatrix as they read an expert (cpu_experts/linear.py). The arrays per format are
quant/formats.py's table (Format.sections); quant/codec.py encodes and decodes them.

Every way to make one keeps the numbers it is given: `from_arrays` wraps stored codes and scales as they
are (the release's FP8 bytes and 128x128 scale grid, a store's INT4 codes), `quantize` quantizes floats
with the reference codecs. A format that cannot hold a shape (int4 needs K to be a multiple of its group
size and of 32) gives a bf16 matrix when `fallback=True`; `requested` keeps the format asked for, so a
caller can say which tensors fell back.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from quant.codec import decode, encode
from quant.formats import get_format
from quant.int4 import GROUP_SIZES, NIBBLE_BLOCK

ALIGN = 64                 # section and group alignment: one cache line, one zmm load
QUANTIZE_ROWS = 2048       # rows quantized at a time (a multiple of fp8's 128): bounds the float temporaries


def _up(n: int, a: int) -> int:
    return -(-n // a) * a


def holds(fmt: str, cols: int, group_size: int = 32) -> bool:
    """Whether `fmt` can store a weight with `cols` inputs (int4: a multiple of the group and of 32)."""
    get_format(fmt)
    return fmt != "int4" or (cols % group_size == 0 and cols % NIBBLE_BLOCK == 0)


@dataclass(frozen=True)
class PackedMatrix:
    fmt: str                 # the stored format: "int4" | "fp8" | "bf16"
    groups: int              # G
    rows: int                # N
    cols: int                # K
    group_size: int          # int4 group size (32 for the others, unused)
    buffer: np.ndarray       # uint8 [groups * stride]
    stride: int              # bytes from one group to the next
    scale_offset: int        # bytes from a group's start to its scales (0: none)
    requested: str           # the format asked for; differs from fmt when the shape fell back to bf16

    @classmethod
    def empty(cls, fmt: str, groups: int, rows: int, cols: int, group_size: int = 32,
              requested: str | None = None) -> "PackedMatrix":
        """A zero-filled matrix of this shape (the constructors fill it)."""
        f = get_format(fmt)
        if fmt == "int4" and group_size not in GROUP_SIZES:
            raise ValueError(f"int4 group_size={group_size}; use one of {GROUP_SIZES}")
        if not holds(fmt, cols, group_size):
            raise ValueError(f"int4 needs the input dimension ({cols}) to be a multiple of the group size "
                             f"({group_size}) and of {NIBBLE_BLOCK}; use fp8 or bf16 for this weight")
        if min(groups, rows, cols) < 1:
            raise ValueError(f"a packed matrix needs positive groups/rows/cols, got {groups}/{rows}/{cols}")
        secs = f.sections(rows, cols, group_size)
        code_bytes = int(np.prod(secs[0][1])) * np.dtype(secs[0][2]).itemsize
        scale_offset = _up(code_bytes, ALIGN) if len(secs) > 1 else 0
        end = scale_offset + int(np.prod(secs[1][1])) * np.dtype(secs[1][2]).itemsize if len(secs) > 1 else code_bytes
        stride = _up(end, ALIGN)
        return cls(fmt, groups, rows, cols, group_size if fmt == "int4" else 32,
                   np.zeros(groups * stride, np.uint8), stride, scale_offset, requested or fmt)

    # -- views ---------------------------------------------------------------------------------------
    def _section(self, g: int, which: int) -> np.ndarray:
        if not 0 <= g < self.groups:
            raise IndexError(f"group {g} out of range for a matrix of {self.groups} groups")
        _, shape, dt = get_format(self.fmt).sections(self.rows, self.cols, self.group_size)[which]
        start = g * self.stride + (self.scale_offset if which else 0)
        return self.buffer[start: start + int(np.prod(shape)) * np.dtype(dt).itemsize].view(dt).reshape(shape)

    def codes(self, g: int = 0) -> np.ndarray:
        """Typed view (no copy) of group g's codes: int4 packed uint8 [N, K/2], fp8 uint8 [N, K], bf16 uint16."""
        return self._section(g, 0)

    def scales(self, g: int = 0) -> np.ndarray | None:
        """Typed view of group g's scales (int4 bf16 bits uint16 [N, K/g], fp8 float32 grid), None for bf16."""
        return self._section(g, 1) if self.scale_offset else None

    @property
    def fell_back(self) -> bool:
        return self.fmt != self.requested

    @property
    def nbytes(self) -> int:
        """Bytes of codes and scales (no padding): what one product reads."""
        return self.groups * get_format(self.fmt).nbytes(self.rows, self.cols, self.group_size)

    def dequantize(self) -> np.ndarray:
        """The reference: float32 [G, N, K], decoded with quant/codec.py."""
        return np.stack([decode(self.fmt, self.codes(g), self.scales(g), self.group_size) for g in range(self.groups)])

    # -- constructors --------------------------------------------------------------------------------
    @classmethod
    def from_arrays(cls, fmt: str, codes: np.ndarray, scales: np.ndarray | None = None,
                    group_size: int = 32) -> "PackedMatrix":
        """Wrap stored arrays as they are (copied into the buffer, never re-quantized).

        codes / scales: one matrix ([N, ...]) or G of them stacked ([G, N, ...]), in the arrays of
        Format.sections: int4 packed uint8 [N, K/2] + uint16 bf16 bits [N, K/g]; fp8 uint8 e4m3 codes
        [N, K] + float32 weight_scale_inv [ceil(N/128), ceil(K/128)]; bf16 uint16 bits [N, K].
        Example:
            >>> codes, scale_inv = ckpt.get_fp8("model.layers.0.self_attn.q_a_proj.weight")
            >>> w = PackedMatrix.from_arrays("fp8", codes, scale_inv)          # the release's bytes
        """
        codes = np.asarray(codes)
        stacked = codes.ndim == 3
        codes3 = codes if stacked else codes[None]
        f = get_format(fmt)
        per_item = np.dtype(f.code_dtype).itemsize * 8 // f.weight_bits
        G, N, K = codes3.shape[0], codes3.shape[1], codes3.shape[2] * per_item
        m = cls.empty(fmt, G, N, K, group_size)
        want = f.sections(N, K, m.group_size)
        if codes3.shape[1:] != want[0][1]:
            raise ValueError(f"{fmt} codes have shape {codes.shape}; expected {want[0][1]} per group")
        if (scales is None) != (len(want) == 1):
            raise ValueError(f"{fmt} {'takes no' if len(want) == 1 else 'needs'} scales")
        if codes3.dtype.kind not in "ui" or codes3.dtype.itemsize != np.dtype(f.code_dtype).itemsize:
            raise ValueError(f"{fmt} codes must be {f.code_dtype} (their bits), got {codes.dtype}")
        for g in range(G):
            m.codes(g)[...] = codes3[g].view(f.code_dtype)
        if scales is not None:
            s3 = np.asarray(scales)
            s3 = s3 if stacked else s3[None]
            if s3.shape != (G, *want[1][1]):
                raise ValueError(f"{fmt} scales have shape {np.shape(scales)}; expected {want[1][1]} per group "
                                 f"for codes {codes.shape}")
            for g in range(G):
                m.scales(g)[...] = s3[g]
        return m

    @classmethod
    def quantize(cls, w: np.ndarray, fmt: str, group_size: int = 32, fallback: bool = True) -> "PackedMatrix":
        """float [N, K] or [G, N, K] -> PackedMatrix in `fmt` by the reference quantizers (quant/codec.py),
        QUANTIZE_ROWS rows at a time. If `fmt` cannot hold K (int4 with K not a multiple of the group or of
        32): bf16 when fallback=True (requested keeps `fmt`), else ValueError."""
        w = np.asarray(w)
        w3 = w if w.ndim == 3 else w[None]
        if w3.ndim != 3:
            raise ValueError(f"quantize expects a [N, K] or [G, N, K] weight, got shape {w.shape}")
        return cls.quantize_rows(lambda g, r0, r1: w3[g, r0:r1], w3.shape, fmt, group_size, fallback)

    @classmethod
    def quantize_rows(cls, rows, shape: tuple[int, int, int], fmt: str, group_size: int = 32,
                      fallback: bool = True) -> "PackedMatrix":
        """quantize() of a weight read QUANTIZE_ROWS rows at a time: rows(g, r0, r1) -> float [r1 - r0, K], so a
        weight too large to hold in float32 (K2's lm_head: 4.7 GB) is never whole in memory."""
        G, N, K = shape
        use = fmt if holds(fmt, K, group_size) or not fallback else "bf16"
        m = cls.empty(use, G, N, K, group_size, requested=fmt)
        sr = get_format(use).scale_rows
        for g in range(G):
            for r in range(0, N, QUANTIZE_ROWS):
                codes, scales = encode(use, rows(g, r, min(r + QUANTIZE_ROWS, N)), m.group_size)
                m.codes(g)[r: r + codes.shape[0]] = codes
                if scales is not None:
                    m.scales(g)[r // sr: r // sr + scales.shape[0]] = scales
        return m


# -- exact rearrangements (no re-quantization) --------------------------------------------------------------
def take_rows(m: PackedMatrix, starts, n: int) -> PackedMatrix:
    """Rows [a, a + n) of a one-group matrix for each a in `starts`, as the groups of a new matrix
    [len(starts), n, K]; exact. fp8 needs each slice's 128-row scale blocks to be whole blocks of the source
    (a % 128 == 0, or the slice inside one block); ValueError otherwise."""
    if m.groups != 1:
        raise ValueError(f"take_rows needs a one-group matrix, got {m.groups} groups")
    starts = [int(a) for a in starts]
    if any(a < 0 or a + n > m.rows for a in starts):
        raise ValueError(f"row slices {starts} + {n} leave the matrix's {m.rows} rows")
    codes, scales = m.codes(), m.scales()
    sub = [codes[a: a + n] for a in starts]
    if m.fmt != "fp8":
        ss = None if scales is None else np.stack([scales[a: a + n] for a in starts])
        return PackedMatrix.from_arrays(m.fmt, np.stack(sub), ss, m.group_size)
    B = get_format("fp8").scale_rows
    for a in starts:
        if a % B and a // B != (a + n - 1) // B:
            raise ValueError(f"fp8 rows [{a}, {a + n}) cut a {B}-row scale block: the slice has no exact "
                             f"block scales; dequantize and use another format for this weight")
    grid = [scales[[(a + B * i) // B for i in range(-(-n // B))]] for a in starts]
    return PackedMatrix.from_arrays("fp8", np.stack(sub), np.stack(grid))


def transposed(m: PackedMatrix) -> PackedMatrix:
    """Each group transposed, [G, K, N]; exact for bf16 and fp8 (a group's 128x128 blocks transpose with
    its codes). int4 groups run along a row's inputs, so a transpose would need new groups: ValueError
    (quantize the transposed float weight instead)."""
    if m.fmt == "int4":
        raise ValueError("an int4 matrix cannot be transposed exactly (its scale groups run along the rows); "
                         "quantize the transposed float weight instead")
    codes = np.stack([np.ascontiguousarray(m.codes(g).T) for g in range(m.groups)])
    scales = None if m.fmt == "bf16" else np.stack([np.ascontiguousarray(m.scales(g).T) for g in range(m.groups)])
    return PackedMatrix.from_arrays(m.fmt, codes, scales)


def stack_rows(parts: list[PackedMatrix]) -> PackedMatrix:
    """One-group matrices of the same format and K, stacked along N (e.g. q_a_proj over kv_a_proj_with_mqa:
    one product instead of two for the same input); exact. fp8 needs every part but the last to have a
    multiple of 128 rows, so the scale grids stack."""
    first = parts[0]
    if any(p.groups != 1 or (p.fmt, p.cols, p.group_size) != (first.fmt, first.cols, first.group_size)
           for p in parts):
        raise ValueError("stack_rows needs one-group matrices of one format, input size and group size; got "
                         + ", ".join(f"{p.fmt} [{p.groups}, {p.rows}, {p.cols}] g{p.group_size}" for p in parts))
    B = get_format(first.fmt).scale_rows
    if any(p.rows % B for p in parts[:-1]):
        raise ValueError(f"{first.fmt}: every part but the last needs a multiple of {B} rows to stack exactly; "
                         f"got {[p.rows for p in parts]}")
    codes = np.concatenate([p.codes() for p in parts])
    scales = None if first.scale_offset == 0 else np.concatenate([p.scales() for p in parts])
    return PackedMatrix.from_arrays(first.fmt, codes, scales, first.group_size)

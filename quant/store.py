"""LayerStore: all routed experts of one MoE layer in one uint8 buffer (RAM or a memory-mapped file).

E = experts, H = hidden, I = inter. The byte layout of one expert is quant/layout.py; expert e
is bytes [e * stride, (e + 1) * stride) of `buffer`, so one expert is one slice (one memcpy to a GPU).

On disk a layer is one safetensors file holding a single U8 tensor "experts" [E, stride]; the format,
shapes, group size and layout version live in the file's __metadata__ (never in its name). We write
the file ourselves so that the header is padded (with spaces, which the safetensors spec allows) to a
4 KiB boundary: the data, and therefore every expert, starts page-aligned, and `load(mmap=True)` maps
it without a copy. Any safetensors reader can still open the file.
"""
from __future__ import annotations

import errno
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from quant import fp8 as qfp8
from quant import int4 as qint4
from quant.codec import decode, encode
from quant.formats import FORMAT_NAMES
from quant.layout import EXPERT_ALIGN, LAYOUT_VERSION, MATRICES, make_layout, matrix_shape

MAGIC = "k2hybrid.LayerStore"
FIX = "re-run the conversion (hybrid-quant convert) to rewrite this layer file"


@dataclass(frozen=True)
class StoreSpec:
    fmt: str                # "int4" | "fp8" | "bf16"
    hidden: int             # H (7168 for K2)
    inter: int              # I (moe_intermediate_size, 2048 for K2)
    group_size: int = 32    # int4 only

    def __post_init__(self):
        if self.fmt not in FORMAT_NAMES:
            raise ValueError(f"StoreSpec.fmt={self.fmt!r}; use one of {', '.join(FORMAT_NAMES)}")
        if self.hidden <= 0 or self.inter <= 0:
            raise ValueError(f"StoreSpec needs positive hidden/inter, got {self.hidden}/{self.inter}")
        if self.fmt == "int4":
            qint4.check_shape(self.inter, self.hidden, self.group_size)
            qint4.check_shape(self.hidden, self.inter, self.group_size)


@dataclass(frozen=True)
class Int4Weights:
    """An already-quantized symmetric INT4 source (e.g. K2-Thinking's compressed-tensors release):
    q int8 [out, in] in [-8, 7], scales as bf16 bit patterns uint16 [out, in / group_size]."""
    q: np.ndarray
    scales: np.ndarray
    group_size: int = 32


def _to_float(name: str, value, shape) -> np.ndarray:
    if isinstance(value, Int4Weights):
        w = qint4.dequantize_groups(value.q, value.scales, value.group_size)
    elif isinstance(value, tuple):
        codes, scale_inv = value
        w = qfp8.dequantize_blocks(codes, np.asarray(scale_inv, dtype=np.float32))
    else:
        w = np.asarray(value, dtype=np.float32)
    if w.shape != shape:
        raise ValueError(f"expert weight {name!r} has shape {w.shape}, expected {shape} (check hidden/inter)")
    return w


def _encode(spec: StoreSpec, name: str, value, shape) -> dict:
    """One matrix in the source format -> {section name: array} in the store format."""
    if spec.fmt == "fp8" and isinstance(value, tuple):     # released FP8: keep bytes and scales as they are
        codes, scale_inv = np.asarray(value[0], dtype=np.uint8), np.asarray(value[1], dtype=np.float32)
        if codes.shape != shape or scale_inv.shape != qfp8.scale_grid_shape(*shape):
            raise ValueError(f"FP8 expert weight {name!r}: codes {codes.shape} / scale_inv {scale_inv.shape}, "
                             f"expected {shape} / {qfp8.scale_grid_shape(*shape)}")
        return {name: codes, name + "_scale": scale_inv}
    if spec.fmt == "int4" and isinstance(value, Int4Weights) and value.group_size == spec.group_size:
        if value.q.shape != shape:            # an INT4 release into the INT4 store: packed as is, lossless
            raise ValueError(f"INT4 expert weight {name!r} has shape {value.q.shape}, expected {shape}")
        return {name: qint4.pack(value.q), name + "_scale": np.asarray(value.scales, dtype=np.uint16)}
    codes, scales = encode(spec.fmt, _to_float(name, value, shape), spec.group_size)
    return {name: codes} if scales is None else {name: codes, name + "_scale": scales}


class LayerStore:
    """All routed experts of one MoE layer in ONE uint8 buffer; see the module docstring."""

    def __init__(self, spec: StoreSpec, n_experts: int, buffer: np.ndarray, source: str = "memory"):
        self.spec, self.n_experts = spec, int(n_experts)
        self.layout = make_layout(spec.fmt, spec.hidden, spec.inter, spec.group_size)
        self.stride = self.layout.stride
        if buffer.dtype != np.uint8 or buffer.ndim != 1 or buffer.size != self.n_experts * self.stride:
            raise ValueError(f"{source}: expert buffer is {buffer.dtype} {buffer.shape}, expected uint8 "
                             f"[{self.n_experts * self.stride}] for {self.n_experts} experts of {spec}")
        self.buffer = buffer
        self.source = source

    @classmethod
    def build(cls, spec: StoreSpec, n_experts: int, get_expert: Callable[[int], dict]) -> "LayerStore":
        """Quantize/pack experts 0..n_experts-1 from get_expert(e) -> {"gate","up","down"} into one buffer.

        Each value is a float32 array ([I, H] for gate/up, [H, I] for down), a block-FP8 tuple
        (codes uint8, scale_inv float32), or Int4Weights. fp8 + FP8 source keeps the bytes, int4 + INT4
        source of the same group size keeps codes and scales; everything else goes through float32 and the
        numpy reference quantizer of the target format.
        """
        store = cls(spec, n_experts, np.zeros(n_experts * make_layout(
            spec.fmt, spec.hidden, spec.inter, spec.group_size).stride, dtype=np.uint8))
        store._fill(get_expert)
        return store

    @classmethod
    def build_file(cls, path, spec: StoreSpec, n_experts: int, get_expert: Callable[[int], dict]) -> None:
        """build() straight into a layer file, expert by expert through a memory map, so converting a
        K2 layer (9.5 GB in INT4) never holds the layer in RAM. Written as PATH.tmp, flushed, fsynced and
        renamed: PATH exists only complete. The file's blocks are reserved before the map is written, so a
        disk that fills up meanwhile raises OSError(ENOSPC) here instead of SIGBUS inside the map."""
        path = Path(path)
        head = _header(spec, n_experts)
        size = n_experts * make_layout(spec.fmt, spec.hidden, spec.inter, spec.group_size).stride
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            f.write(head)
            f.truncate(len(head) + size)
            _reserve(f.fileno(), len(head) + size)
        buf = np.memmap(tmp, dtype=np.uint8, mode="r+", offset=len(head), shape=(size,))
        store = cls(spec, n_experts, buf, source=str(tmp))
        store._fill(get_expert)
        buf.flush()
        del buf, store
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        tmp.replace(path)

    def _fill(self, get_expert: Callable[[int], dict]) -> None:
        spec = self.spec
        for e in range(self.n_experts):
            mats = get_expert(e)
            missing = set(MATRICES) - set(mats)
            if missing:
                raise ValueError(f"get_expert({e}) is missing {sorted(missing)}; return gate, up and down")
            for m in MATRICES:
                shape = matrix_shape(m, spec.hidden, spec.inter)
                for name, arr in _encode(spec, m, mats[m], shape).items():
                    self.section(e, name)[...] = arr

    def section(self, e: int, name: str) -> np.ndarray:
        """Typed view (no copy) of one section ("gate", "down_scale", ...) of expert e."""
        s = self.layout.sections[name]
        base = self._check(e) * self.stride + s.offset
        return self.buffer[base: base + s.nbytes].view(s.dtype).reshape(s.shape)

    def _check(self, e: int) -> int:
        if not 0 <= e < self.n_experts:
            raise IndexError(f"expert id {e} out of range for a layer of {self.n_experts} experts")
        return int(e)

    def expert_nbytes(self) -> int:
        """Bytes of one expert's weights and scales as stored (alignment padding excluded)."""
        return self.layout.used

    def expert_bytes(self, e: int) -> np.ndarray:
        """uint8 view of expert e's whole slice (stride bytes, page-aligned in files)."""
        base = self._check(e) * self.stride
        return self.buffer[base: base + self.stride]

    def dequantize(self, e: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The reference: (gate f32 [I, H], up f32 [I, H], down f32 [H, I]) of expert e."""
        secs = self.layout.sections
        return tuple(decode(self.spec.fmt, self.section(e, m),
                            self.section(e, m + "_scale") if m + "_scale" in secs else None, self.spec.group_size)
                     for m in MATRICES)

    def metadata(self) -> dict:
        return _metadata(self.spec, self.n_experts)

    def save(self, path) -> None:
        """Write one safetensors file; the data starts on a 4 KiB boundary (header padded with spaces)."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            f.write(_header(self.spec, self.n_experts))
            f.write(memoryview(self.buffer))
        tmp.replace(path)

    @classmethod
    def load(cls, path, mmap: bool = True) -> "LayerStore":
        """Open a layer file written by save(); mmap=True maps it read-only without copying."""
        path = Path(path)
        meta, start, size = _read_header(path)
        try:
            spec = StoreSpec(meta["fmt"], int(meta["hidden"]), int(meta["inter"]), int(meta["group_size"]))
            n = int(meta["n_experts"])
        except (KeyError, ValueError) as exc:
            raise ValueError(f"{path}: bad expert-store metadata ({exc}); {FIX}") from exc
        stride = make_layout(spec.fmt, spec.hidden, spec.inter, spec.group_size).stride
        if int(meta.get("expert_stride", -1)) != stride or size != n * stride:
            raise ValueError(f"{path}: the data ({size} bytes, stride {meta.get('expert_stride')}) does not match "
                             f"{n} experts of {spec} (stride {stride}); {FIX}")
        if mmap:
            buf = np.memmap(path, dtype=np.uint8, mode="r", offset=start, shape=(size,))
        else:
            buf = np.fromfile(path, dtype=np.uint8, count=size, offset=start)
        return cls(spec, n, buf, source=str(path))


def _reserve(fd: int, nbytes: int) -> None:
    """Allocate the file's blocks now: writes through a memory map into a sparse file that the disk cannot
    hold end in SIGBUS, with no message and no way to catch it. Filesystems without fallocate support are
    left sparse (as before)."""
    try:
        os.posix_fallocate(fd, 0, nbytes)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
            raise


def _metadata(s: StoreSpec, n_experts: int) -> dict:
    stride = make_layout(s.fmt, s.hidden, s.inter, s.group_size).stride
    return {"format": MAGIC, "layout_version": str(LAYOUT_VERSION), "fmt": s.fmt, "hidden": str(s.hidden),
            "inter": str(s.inter), "group_size": str(s.group_size), "n_experts": str(n_experts),
            "expert_stride": str(stride)}


def _header(spec: StoreSpec, n_experts: int) -> bytes:
    """8-byte length + JSON header, padded with spaces so the data starts on a 4 KiB boundary."""
    meta = _metadata(spec, n_experts)
    size = n_experts * int(meta["expert_stride"])
    header = {"__metadata__": meta,
              "experts": {"dtype": "U8", "shape": [n_experts, int(meta["expert_stride"])], "data_offsets": [0, size]}}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * ((-(8 + len(text))) % EXPERT_ALIGN)
    return struct.pack("<Q", len(text)) + text


def _read_header(path: Path) -> tuple[dict, int, int]:
    fix = FIX
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise ValueError(f"{path}: file too short for a safetensors header; {fix}")
            (n,) = struct.unpack("<Q", raw)
            if n > 100_000_000:
                raise ValueError(f"{path}: header length {n} is not plausible (not a safetensors file?); {fix}")
            header = json.loads(f.read(n))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: cannot read the safetensors header ({exc}); {fix}") from exc
    meta = header.get("__metadata__") or {}
    if meta.get("format") != MAGIC:
        raise ValueError(f"{path}: __metadata__ format is {meta.get('format')!r}, not {MAGIC!r}: this is not an "
                         f"expert-store layer file; {fix}")
    if meta.get("layout_version") != str(LAYOUT_VERSION):
        raise ValueError(f"{path}: layout_version {meta.get('layout_version')!r}, this code reads "
                         f"{LAYOUT_VERSION}; {fix}")
    t = header.get("experts")
    if not t or t.get("dtype") != "U8":
        raise ValueError(f"{path}: no U8 tensor 'experts' in the file; {fix}")
    begin, end = t["data_offsets"]
    start = 8 + n + begin
    if path.stat().st_size < start + (end - begin):
        raise ValueError(f"{path}: file is truncated ({path.stat().st_size} bytes, needs {start + end - begin}); {fix}")
    return meta, start, end - begin

"""Hot-set copies to a device, the packed form kept there, and its decoding.

    copier = ExpertCopier(device)                 one per device: its own side stream and pinned staging slots
    copier.packed(store, e) -> PackedExpert       expert e's stored bytes (one slice) on the device
    copier.dequantized(store, e, dtype)           -> (gate [I, H], up [I, H], down [H, I]) in dtype, new tensors
    DecodeBuffer(spec, device, dtype).weights(p)  -> (gate, up, down) decoded into one reused buffer
    DECODERS[name](p, m, out, pool)               matrix m of p into out [r, c] (float32 or bfloat16)

Decoding equals LayerStore.dequantize(e)[m].to(dtype) bit for bit: each weight is code x scale computed in
float32 (exact for INT4; the same IEEE product as numpy for FP8) and rounded to dtype once. Two decoders, by
where the bytes live (DECODERS):
- "torch", on CUDA: elementwise ops on the device. INT4: a nibble mask (or shift) and one addcmul per half,
  about 3P + D bytes of memory traffic (P weights, D bytes of output); FP8: a conversion and a multiply by
  the block scales, P + 3D. The matmul that follows reads D. A fused decode kernel would make it P/2 + D.
- "numba", on the CPU stand-in: cpu_experts' dequant_rows over the packed slice, its rows split over torch's
  thread count (cpu_experts' RowPool). torch's CPU kernels for mixed-dtype and float8 elementwise ops are
  scalar: one K2 gate matrix took 66 ms (INT4) and 84 ms (FP8) in torch with 2 threads against 18 and 26 ms
  in Numba with one (measured on the 2-core development machine).

Copies on CUDA: the slice is memcpy'd into one of two pinned staging slots, reused (a slot is refilled once
its previous transfer has finished: no pin_memory() per copy), and copied on the copier's own side stream. So
the host stages expert n+1 while expert n crosses the link, and each device's copier drives its own link
while the others drive theirs. Tensors made on the side stream are recorded on the stream that was current at
the call (where they will be used), so the caching allocator does not hand their memory out early.
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import numpy as np
import torch

from cpu_experts.paths import KERNELS
from cpu_experts.pool import RowPool
from hybrid.core.placement import packed_expert_bytes
from hybrid.runtime.decode import decode_into
from quant.formats import get_format
from quant.layout import MATRICES, make_layout, matrix_shape

_TORCH_DTYPES = {"uint8": torch.uint8, "uint16": torch.int16, "float32": torch.float32}   # uint16: bf16 bits
_SECTIONS = ("gate", "up", "down", "gate_scale", "up_scale", "down_scale")  # cpu_experts' `lay` order


@dataclass(frozen=True)
class _Layout:
    """Where each section of one stored expert lies inside its packed slice."""
    nbytes: int                                             # the slice copied (packed_expert_bytes)
    sections: tuple[tuple[str, int, int, torch.dtype, tuple], ...]   # name, offset, bytes, dtype, shape
    offsets: np.ndarray                                     # int64 [6] in _SECTIONS order (0: absent)


@functools.lru_cache(maxsize=None)
def _layout(spec) -> _Layout:
    lay = make_layout(spec.fmt, spec.hidden, spec.inter, spec.group_size)
    secs = tuple((n, s.offset, s.nbytes, _TORCH_DTYPES[s.dtype], tuple(s.shape)) for n, s in lay.sections.items())
    offsets = np.array([lay.sections[n].offset if n in lay.sections else 0 for n in _SECTIONS], dtype=np.int64)
    return _Layout(packed_expert_bytes(spec.fmt, spec.hidden, spec.inter, spec.group_size), secs, offsets)


@dataclass(frozen=True)
class PackedExpert:
    """One routed expert as stored (quant/layout.py), on a device: a single uint8 tensor and typed views of
    its sections ("gate" codes, "gate_scale", ...; bf16 bits as int16)."""
    spec: object                          # the store's StoreSpec (format, hidden, inter, group size)
    blob: torch.Tensor                    # uint8 [nbytes]
    sections: dict[str, torch.Tensor]

    @classmethod
    def of(cls, spec, blob: torch.Tensor) -> "PackedExpert":
        views = {n: blob[o:o + nb].view(dt).view(shape) for n, o, nb, dt, shape in _layout(spec).sections}
        return cls(spec, blob, views)

    @property
    def nbytes(self) -> int:
        return self.blob.numel()

    def scales(self, m: str) -> torch.Tensor | None:
        """Matrix m's scales ("gate" -> the "gate_scale" view), or None for a format without scales."""
        return self.sections[m + "_scale"] if get_format(self.spec.fmt).scale_dtype else None


# ---- decoders: (p, matrix name, out [r, c], pool) -> None: out = LayerStore.dequantize's matrix in out.dtype;
# pool: a RowPool for the Numba decoder's rows (None: the calling thread), unused by the torch one. Each
# dispatches by format through its layer's one table: decode.py's decode_into, cpu_experts' KERNELS ----------
def _torch_decode(p: PackedExpert, m: str, out: torch.Tensor, pool: RowPool | None = None) -> None:
    decode_into(p.spec.fmt, p.sections[m], p.scales(m), p.spec.group_size, out)


def _numba_decode(p: PackedExpert, m: str, out: torch.Tensor, pool: RowPool | None = None) -> None:
    """The CPU kernels read the slice as a one-expert LayerStore buffer (host memory only)."""
    s = p.spec
    buf = p.blob.numpy()
    f32 = out if out.dtype == torch.float32 else torch.empty(out.shape, dtype=torch.float32)
    args = (buf, buf.view(np.uint16), buf.view(np.float32), np.int64(p.nbytes), _layout(s).offsets,
            np.int64(s.hidden), np.int64(s.inter), np.int64(s.group_size), 0, MATRICES.index(m), 0, f32.numpy())
    rows = KERNELS[s.fmt].plain.dequant_rows               # the portable kernels: any CPU, any shape
    if pool is None:
        rows(*args[:-1], 0, out.shape[0], args[-1])
    else:
        pool.run(rows, args, out.shape[0])
    if f32 is not out:
        out.copy_(f32)                                      # float32 -> dtype: the reference's one rounding


DECODERS = {"torch": _torch_decode, "numba": _numba_decode}


def decoder_for(device: torch.device):
    """The decoder for tensors on `device` (see the module docstring for why there are two)."""
    return DECODERS["numba" if device.type == "cpu" else "torch"]


def _pool_for(device: torch.device) -> RowPool | None:
    """Threads for the Numba decoder: as many as torch uses for the matmuls that follow (CPU only)."""
    return RowPool(torch.get_num_threads()) if device.type == "cpu" else None


class DecodeBuffer:
    """One expert's (gate [I, H], up [I, H], down [H, I]) in the compute dtype on one device: where packed hot
    experts are decoded for each use. weights(p) rewrites it, so what it returns is valid until the next
    call (on CUDA, work queued before the next call on the same stream still reads the old contents)."""

    def __init__(self, spec, device: torch.device, dtype: torch.dtype):
        self.mats = tuple(torch.empty(matrix_shape(m, spec.hidden, spec.inter), dtype=dtype, device=device)
                          for m in MATRICES)
        self._decode, self._pool = decoder_for(device), _pool_for(device)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.mats)

    def weights(self, p: PackedExpert) -> tuple[torch.Tensor, ...]:
        for m, out in zip(MATRICES, self.mats):
            self._decode(p, m, out, self._pool)
        return self.mats


class ExpertCopier:
    """One device's hot-set copies (see the module docstring); on the CPU stand-in a plain memory copy."""
    SLOTS = 2                 # double buffering: stage the next expert while the previous one crosses the link

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self._decode, self._pool = decoder_for(device), _pool_for(device)
        self._slots: list[torch.Tensor | None] = [None] * self.SLOTS     # pinned uint8 staging buffers
        self._done: list[torch.cuda.Event | None] = [None] * self.SLOTS  # each slot's last transfer
        self._turn = 0

    def packed(self, store, e: int) -> PackedExpert:
        """Expert e of a LayerStore, its stored bytes on this device."""
        src = store.expert_bytes(e)[:_layout(store.spec).nbytes]
        if not self.cuda:
            return PackedExpert.of(store.spec, torch.from_numpy(np.array(src)))   # a copy that owns its memory
        i, slot = self._stage(src)
        with torch.cuda.stream(self.stream):
            blob = torch.empty(src.size, dtype=torch.uint8, device=self.device)
            blob.copy_(slot, non_blocking=True)
            self._done[i] = self.record()
        blob.record_stream(torch.cuda.current_stream(self.device))
        return PackedExpert.of(store.spec, blob)

    def dequantized(self, store, e: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """Expert e as new (gate, up, down) tensors in `dtype`: the packed bytes travel, the decoding runs on
        this device (on the side stream, on CUDA)."""
        p = self.packed(store, e)
        with self._side():
            mats = tuple(torch.empty(matrix_shape(m, store.spec.hidden, store.spec.inter), dtype=dtype,
                                     device=self.device) for m in MATRICES)
            for m, out in zip(MATRICES, mats):
                self._decode(p, m, out, self._pool)
        if self.cuda:
            for t in mats:
                t.record_stream(torch.cuda.current_stream(self.device))
        return mats

    def record(self) -> torch.cuda.Event | None:
        """An event after every copy queued so far (None on the CPU, where copies are done on return)."""
        if not self.cuda:
            return None
        ev = torch.cuda.Event()
        ev.record(self.stream)
        return ev

    def _side(self):
        return torch.cuda.stream(self.stream) if self.cuda else contextlib.nullcontext()

    def _stage(self, src: np.ndarray) -> tuple[int, torch.Tensor]:
        """(slot index, pinned uint8 view holding a copy of src); waits until that slot's last transfer ended."""
        i = self._turn % self.SLOTS
        self._turn += 1
        if self._done[i] is not None:
            self._done[i].synchronize()
        if self._slots[i] is None or self._slots[i].numel() < src.size:
            self._slots[i] = torch.empty(src.size, dtype=torch.uint8, pin_memory=True)
        view = self._slots[i][:src.size]
        np.copyto(view.numpy(), src)
        return i, view


def device_expert(store, e: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """Expert e of a LayerStore as new (gate, up, down) tensors in `dtype` on `device` (a one-off copier)."""
    return ExpertCopier(device).dequantized(store, e, dtype)

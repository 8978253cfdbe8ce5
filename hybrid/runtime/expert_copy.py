"""One stored expert -> device tensors: the packed bytes travel, the dequantization runs on the device.

    device_expert(store, e, device, dtype, non_blocking) -> (gate [I, H], up [I, H], down [H, I])

A hot-set load used to dequantize on the host with numpy (LayerStore.dequantize: ~0.26 s for one K2 expert on
one core) and then copy float weights; `hybrid plan` showed that this made every run-time copy cost more than
the tokens it served. Here the store's own sections (INT4 codes + bf16 scales, FP8 codes + block scales, or
bf16) are copied as they are (3.5x fewer bytes than bf16 for INT4) and decoded with torch ops on the device.
Results equal LayerStore.dequantize bit for bit in float32 (same products of exactly representable values).
"""
from __future__ import annotations

import warnings

import numpy as np
import torch

from quant.layout import MATRICES

FP8_BLOCK = 128


def _to_device(a: np.ndarray, device: torch.device, non_blocking: bool) -> torch.Tensor:
    if a.dtype == np.uint16:
        a = a.view(np.int16)                      # same bits; torch's uint16 support is partial
    with warnings.catch_warnings():               # read-only memory maps: nothing here writes to them
        warnings.simplefilter("ignore", UserWarning)
        t = torch.from_numpy(np.ascontiguousarray(a))
    if device.type == "cuda":
        t = t.pin_memory()                        # staging copy, so the transfer can be asynchronous
        return t.to(device, non_blocking=non_blocking)
    return t


def _int4(codes: torch.Tensor, scales: torch.Tensor, group: int) -> torch.Tensor:
    """packed uint8 [r, c/2] (quant/int4.py layout) + bf16-bit scales int16 [r, c/group] -> float32 [r, c]."""
    r = codes.shape[0]
    b = codes.view(r, -1, 1, 16)
    q = torch.cat([b & 0xF, b >> 4], dim=2).reshape(r, -1).to(torch.float32) - 8.0
    s = scales.view(torch.bfloat16).to(torch.float32)
    return (q.view(r, -1, group) * s[:, :, None]).view(r, -1)


def _fp8(codes: torch.Tensor, scale_inv: torch.Tensor) -> torch.Tensor:
    """e4m3 codes uint8 [r, c] + scale_inv float32 [ceil(r/128), ceil(c/128)] -> float32 [r, c]."""
    r, c = codes.shape
    w = codes.view(torch.float8_e4m3fn).to(torch.float32)
    s = scale_inv.repeat_interleave(FP8_BLOCK, 0)[:r].repeat_interleave(FP8_BLOCK, 1)[:, :c]
    return w * s


def device_expert(store, e: int, device: torch.device, dtype: torch.dtype,
                  non_blocking: bool = True) -> tuple[torch.Tensor, ...]:
    """Expert e of a LayerStore as (gate, up, down) in `dtype` on `device` (see the module docstring)."""
    fmt = store.spec.fmt
    out = []
    for m in MATRICES:
        codes = _to_device(store.section(e, m), device, non_blocking)
        if fmt == "int4":
            w = _int4(codes, _to_device(store.section(e, m + "_scale"), device, non_blocking), store.spec.group_size)
        elif fmt == "fp8":
            w = _fp8(codes, _to_device(store.section(e, m + "_scale"), device, non_blocking))
        else:
            w = codes.view(torch.bfloat16)
            if device.type != "cuda":
                w = w.clone()                     # the store may be memory-mapped: a copy owns its memory
        out.append(w.to(dtype))
    return tuple(out)

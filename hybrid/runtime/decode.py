"""Packed weights decoded by torch ops on their device, one matrix into a given output tensor.

    decode_into(fmt, codes, scales, group_size, out [r, c]) -> out
        int4: codes uint8 [r, c/2] in quant/int4.py's layout (per 32 inputs 16 bytes: the low nibbles are the
              first 16, the high nibbles the next 16), scales bf16 bits (int16) [r, c/group_size]
        fp8:  codes uint8 [r, c] (e4m3 bits), scales float32 [ceil(r/128), ceil(c/128)], multiplied
        bf16: codes bf16 bits (int16) [r, c], no scales
Each weight is code x scale in float32 (exact for INT4; the same IEEE product as numpy for FP8), rounded once
to out's dtype: equal to the numpy references in quant/ bit for bit. Used by the dense layers kept packed on
a device and by the packed hot set (hybrid/runtime/expert_copy.py): the one torch decode dispatch, by format
(_INTO, keyed by quant/formats.py's FORMAT_NAMES; every decoder takes the same arguments).
"""
from __future__ import annotations

import torch

from quant.formats import FORMAT_NAMES, get_format

FP8_BLOCK = 128
INT4_BLOCK = 32


def int4_into(codes: torch.Tensor, scales: torch.Tensor, group_size: int, out: torch.Tensor) -> torch.Tensor:
    r, c = out.shape
    g = group_size
    shape = (r, c // g, g // INT4_BLOCK, INT4_BLOCK // 2)    # row, scale group, block of 32 inputs, byte
    b = codes.reshape(shape)
    s = scales.view(torch.bfloat16).to(out.dtype).view(r, c // g, 1, 1)
    neg8s = s * -8                                          # exact: a power of two
    o = out.view(r, c // g, g // INT4_BLOCK, 2, INT4_BLOCK // 2)
    q = torch.empty(shape, dtype=torch.uint8, device=out.device)
    torch.bitwise_and(b, 15, out=q)
    torch.addcmul(neg8s, q, s, out=o[..., 0, :])            # n s - 8 s: exact products, exact sum, one rounding
    torch.bitwise_right_shift(b, 4, out=q)
    torch.addcmul(neg8s, q, s, out=o[..., 1, :])
    return out


def fp8_into(codes: torch.Tensor, scales: torch.Tensor, group_size: int, out: torch.Tensor) -> torch.Tensor:
    r, c = out.shape
    B = FP8_BLOCK
    out.copy_(codes.view(torch.float8_e4m3fn))              # exact in float32 and bfloat16
    if r % B == 0 and c % B == 0:                           # the product in float32, then one rounding
        out.view(r // B, B, c // B, B).mul_(scales.view(r // B, 1, c // B, 1))
    else:                                                   # partial blocks (small models): the grid spelled out
        out.mul_(scales.repeat_interleave(B, 0)[:r].repeat_interleave(B, 1)[:, :c])
    return out


def bf16_into(codes: torch.Tensor, scales: None, group_size: int, out: torch.Tensor) -> torch.Tensor:
    return out.copy_(codes.view(torch.bfloat16))


_INTO = {"int4": int4_into, "fp8": fp8_into, "bf16": bf16_into}     # group_size matters to int4 only
assert tuple(_INTO) == FORMAT_NAMES, "one torch decoder per format of quant/formats.py"


def decode_into(fmt: str, codes: torch.Tensor, scales: torch.Tensor | None, group_size: int,
                out: torch.Tensor) -> torch.Tensor:
    """Matrix (codes, scales) in `fmt` decoded into out [r, c] (see the module docstring); returns out."""
    get_format(fmt)
    return _INTO[fmt](codes, scales, group_size, out)

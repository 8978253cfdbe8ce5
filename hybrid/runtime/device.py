"""Where the device side runs, in which dtype, and with how many CPU threads: one rule for each.

    resolve_device("auto") -> cuda if present, else cpu (the CPU stands in for the GPU)
    resolve_dtype("auto", device) -> bfloat16 on CUDA, float32 on the CPU
    resolve_threads(None) -> the physical cores (cpu_experts.physical_cores, the one definition)
"""
from __future__ import annotations

import torch

from cpu_experts.moe import physical_cores

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def resolve_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        d = torch.device(device)
    except RuntimeError:
        raise ValueError(f"device {str(device)!r} is not a device name; use 'auto', 'cpu' or 'cuda[:N]'") from None
    if d.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} was asked for but CUDA is not available; "
                         f"use device='cpu' (or 'auto')")
    if d.type not in ("cuda", "cpu"):
        raise ValueError(f"device {str(device)!r} is not supported; use 'auto', 'cpu' or 'cuda[:N]'")
    return d


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; use 'auto', 'float32' or 'bfloat16'")
    return DTYPES[dtype]


def resolve_threads(threads: int | None) -> int:
    """CPU threads for the expert kernels and host-side torch: the physical cores unless given."""
    return threads or physical_cores()
